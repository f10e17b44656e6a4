"""Storage formats: every layout reads back what its writer stored, views are views (no copies), and
a format that does not describe its memory is refused."""
import pytest
import torch

from lcx_plugin.kernels.paged import formats

from .paged_cases import FORMATS, QUANT_FORMATS, empty_format


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_then_read_every_token_in_every_format(fmt):
    g = torch.Generator().manual_seed(0)
    kv = empty_format(fmt, 5, 3, 16, 32, torch.bfloat16)
    k = torch.randn(40, 3, 32, generator=g).bfloat16()
    v = torch.randn(40, 3, 32, generator=g).bfloat16()
    slots = torch.randperm(80, generator=g)[:40]
    kv.write(k, v, torch.cat([slots, torch.tensor([-1, -1])]))  # padding slots are skipped
    for i, s in enumerate(slots.tolist()):
        kk, vv = kv.token(s // 16, 2, s % 16)
        assert torch.equal(kk, k[i, 2]) and torch.equal(vv, v[i, 2])
    blocks = (slots[:6] // 16).view(2, 3)
    heads = torch.tensor([[0, 1, 2], [2, 1, 0]])
    gk, gv = kv.gather(blocks, heads, torch.float32)
    assert gk.shape == (2, 3, 16, 32) and gk.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            off = int(slots[i * 3 + j]) % 16
            assert torch.equal(gk[i, j, off], kv.token(int(blocks[i, j]), int(heads[i, j]), off)[0].float())
            assert torch.equal(gv[i, j, off], kv.token(int(blocks[i, j]), int(heads[i, j]), off)[1].float())


#: Layouts whose tokens are contiguous rows on both sides: ``gather_tokens`` copies rows there.
ROW_SIDES = {"plain": (True, True), "nhd": (True, True), "token-pool": (True, True),
             "vllm-cpu-vec": (False, True), "vllm-cpu-amx": (False, False)}


@pytest.mark.parametrize("fmt", FORMATS + QUANT_FORMATS)
def test_gather_tokens_reads_the_tokens_token_reads(fmt):
    """Single-token gathers (rows copied where a layout allows, element indexing where not) against
    the one-token accessor, on fresh random tokens, heads and offsets."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    kv = empty_format(fmt, 6, 3, 16, 32, torch.bfloat16)
    slots = torch.randperm(96, generator=g)[:70]
    kv.write(torch.randn(70, 3, 32, generator=g).bfloat16(), torch.randn(70, 3, 32, generator=g).bfloat16(), slots)
    pick = slots[torch.randint(0, 70, (4, 5), generator=g)]
    heads = torch.randint(0, 3, (4, 5), generator=g)
    gk, gv = kv.gather_tokens(pick // 16, heads, pick % 16, torch.float64)
    assert gk.shape == gv.shape == (4, 5, 32)
    for i in range(4):
        for j in range(5):
            k, v = kv.token(int(pick[i, j]) // 16, int(heads[i, j]), int(pick[i, j]) % 16)
            torch.testing.assert_close(gk[i, j], k.double(), rtol=1e-6, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")
            torch.testing.assert_close(gv[i, j], v.double(), rtol=1e-6, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")
    if fmt in ROW_SIDES:
        assert tuple(side is not None for side in kv._rows) == ROW_SIDES[fmt]


@pytest.mark.parametrize("fmt", ["plain", "vllm-cpu-vec", "nhd", "token-pool"])
def test_four_d_views_share_memory_with_the_cache(fmt):
    kv = empty_format(fmt, 4, 2, 16, 64, torch.float32, fill=0.0)
    k4, v4 = kv.k4, kv.v4
    assert k4.shape == v4.shape == (4, 2, 16, 64)
    k4[1, 1, 3, 5] = 7.0
    assert kv.token(1, 1, 3)[0][5] == 7.0
    assert kv.bits == 32


def test_tiled_amx_keys_have_no_four_d_view():
    kv = empty_format("vllm-cpu-amx", 4, 2, 32, 64, torch.bfloat16, fill=0.0)
    assert kv.k4 is None and kv.v4 is None and kv.bits == 16


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match=r"must be \[num_blocks, num_kv_heads, block_size, 2\*head_dim\]"):
        formats.plain(torch.zeros(4, 2, 16, 63))
    with pytest.raises(ValueError, match="amx packing needs a 16-bit cache"):
        formats.vllm_cpu(torch.zeros(4, 2, 32, 128), "amx")
    with pytest.raises(ValueError, match="not a whole number of pages"):
        formats.token_pool(torch.zeros(30, 2, 8), torch.zeros(30, 2, 8), 16)
    kv = formats.plain(torch.zeros(4, 2, 16, 128))
    with pytest.raises(ValueError, match="bits=4 but the views hold 32-bit elements"):
        formats.KVFormat("packed", kv.k, kv.v, bits=4)
