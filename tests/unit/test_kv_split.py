"""The streaming companion's sizing: equal page bytes, peak accounting, clear errors."""
import pytest

from lcx_plugin.errors import LcxConfigError

kv_split = pytest.importorskip("lcx_plugin.attention_backends.vllm.kv_split")


def test_companion_pages_hold_as_many_bytes_as_the_layers_own():
    assert kv_split.companion_block_size(128, 1, 2) == 64  # 1 retrieval, 2 streaming heads
    assert kv_split.companion_block_size(128, 2, 1) == 256
    with pytest.raises(LcxConfigError, match="must be\n?.*multiple of 16|whole multiple of 16"):
        kv_split.companion_block_size(128, 1, 3)


def test_accounting_is_sinks_plus_twice_the_window_and_never_more_than_the_context():
    import torch

    spec = kv_split.StreamSpec(block_size=64, num_kv_heads=2, head_size=64, head_size_v=64, dtype=torch.bfloat16,
                               sliding_window=256, sink_len=64)
    assert spec.sink_blocks == 1
    assert spec.max_admission_blocks_per_request(4096, 8192) == 1 + 2 * (4 + 1)
    assert spec.max_admission_blocks_per_request(4096, 256) == 4  # a context shorter than sink + window
    assert spec.max_memory_usage_bytes.__func__ is type(spec).__mro__[1].max_memory_usage_bytes


@pytest.mark.parametrize("tp, total, local, want", [
    (2, 8, 4, [0, 4]),  # each rank its own half of the KV heads
    (4, 8, 2, [0, 2, 4, 6]),
    (4, 2, 1, [0, 0, 1, 1]),  # fewer KV heads than ranks: vLLM replicates each over tp/total ranks
])
def test_tensor_parallel_ranks_take_their_own_kv_heads(monkeypatch, tp, total, local, want):
    """The slice each rank takes of a head pattern, through vLLM's own tensor-parallel helpers
    (the CPU engine cannot run SmolLM2 with tensor_parallel_size=2: its 9 query heads do not split)."""
    import vllm.distributed as dist

    from lcx_plugin.attention_backends.vllm import compat

    got = []
    for rank in range(tp):
        monkeypatch.setattr(dist, "get_tensor_model_parallel_world_size", lambda: tp)
        monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda r=rank: r)
        got.append(compat.kv_head_offset(local, total))
    assert got == want
