"""Position-neutral page search (``hip`` with ``extrapolate``): the layer core summarises keys turned
back to position 0, and the search turns each query back from its position, so the pages chosen
from rotated inputs are the pages chosen from the un-rotated ones; the rotated reading chooses
others."""
import pytest
import torch

from lcx_plugin.config import LcxConfig
from lcx_plugin.kernels.paged import BatchPlan, formats
from lcx_plugin.kernels.paged.rope import Rope
from lcx_plugin.layer import LayerCore
from lcx_plugin.selectors import SelectContext
from lcx_plugin.state import RequestStates

BS, HKV, HQ, D = 16, 2, 4, 32
ROPE = Rope.standard(D, theta=300.0)  # short wavelengths: distance moves scores a lot


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _core(extrapolate: bool) -> LayerCore:
    config = LcxConfig.from_dict({"method": "hip", "sink": 16, "window": 32, "budget": 48, "query_block": 32,
                                  "refresh_every": 1, "dense_layers": [], "extrapolate": extrapolate})
    return LayerCore(3, HQ, HKV, D, D ** -0.5, config, "torch", rope=ROPE if extrapolate else None)


def _pages(core: LayerCore, keys: torch.Tensor, query: torch.Tensor, q_lens: list[int], seq_lens: list[int],
           positions: torch.Tensor | None):
    """Write ``keys`` (one sequence per row of the table) through the core, then select."""
    n_pages = [-(-s // BS) for s in seq_lens]
    table = torch.zeros(len(seq_lens), max(n_pages), dtype=torch.int32)
    at = 0
    for b, n in enumerate(n_pages):
        table[b, :n] = torch.arange(at, at + n, dtype=torch.int32).flip(0)  # pages in reverse order
        at += n
    kv = formats.plain(torch.full((at, HKV, BS, 2 * D), float("nan")))
    slots = torch.cat([table[b, torch.arange(s) // BS].long() * BS + torch.arange(s) % BS for b, s in enumerate(seq_lens)])
    core.write(kv, keys, torch.zeros_like(keys), slots, positions=positions)
    plan = BatchPlan.from_lists(q_lens, seq_lens, table)
    ctx = SelectContext(layer=3, query=query, kv=kv, plan=plan, request_ids=tuple(f"r{b}" for b in range(len(q_lens))),
                        num_heads=HQ, pages=core.pages, requests=RequestStates(), scale=D ** -0.5, rope=core.rope)
    sel = core.selector.select(ctx)
    return sel.indices, sel.counts


@pytest.mark.parametrize("q_lens", [[1, 1], [1, 96]], ids=["decode", "prefill_and_decode"])
def test_pages_chosen_from_rotated_inputs_are_the_unrotated_ones(q_lens):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    seq_lens = [700, 600]
    raw = torch.randn(sum(seq_lens), HKV, D, generator=g, dtype=torch.float64)
    key_pos = torch.cat([torch.arange(s) for s in seq_lens])
    q_raw = torch.randn(sum(q_lens), HQ, D, generator=g, dtype=torch.float64) * 3
    q_pos = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
    rotated_keys = ROPE.rotate(raw, key_pos[:, None]).float()
    rotated_q = ROPE.rotate(q_raw, q_pos[:, None]).float()
    # The statement: the same search run on the un-rotated vectors, without re-positioning.
    want = _pages(_core(False), raw.float(), q_raw.float(), q_lens, seq_lens, None)
    got = _pages(_core(True), rotated_keys, rotated_q, q_lens, seq_lens, key_pos)
    assert torch.equal(got[1], want[1]), f"seed={seed}"
    for b in range(len(q_lens)):
        for g_ in range(HKV):
            for qb in range(got[1].shape[2]):
                n = int(got[1][b, g_, qb])
                assert got[0][b, g_, qb, :n].tolist() == want[0][b, g_, qb, :n].tolist(), f"seed={seed}"
    absolute = _pages(_core(False), rotated_keys, rotated_q, q_lens, seq_lens, None)
    assert not (torch.equal(absolute[1], want[1]) and torch.equal(absolute[0], want[0])), f"seed={seed}: no effect"


def test_a_position_neutral_layer_refuses_a_write_without_positions():
    core = _core(True)
    kv = formats.plain(torch.zeros(2, HKV, BS, 2 * D))
    with pytest.raises(ValueError, match="must pass each key's position"):
        core.write(kv, torch.zeros(3, HKV, D), torch.zeros(3, HKV, D), torch.arange(3))
