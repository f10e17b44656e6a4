"""The layer core: one step's batch split into dense and selected sequences, each served by its
kernel, the results back in the right rows; against the float64 reference."""
import pytest
import torch

from lcx_plugin.config import LcxConfig
from lcx_plugin.kernels.paged.reference import paged_attention_reference
from lcx_plugin.layer import LayerCore, plan_step
from lcx_plugin.selectors import SelectContext

from ..kernels.paged_cases import make_problem


def test_mixed_batch_routes_dense_and_selected_sequences_and_keeps_row_order():
    # seq 0 and 2 are long enough for a selection, seq 1 is short (dense), seq 3 a long decode.
    problem = make_problem([60, 9, 70, 50], [12, 9, 1, 1], 6, 2, block_size=8, seed=11, fmt="vllm-cpu-vec")
    config = LcxConfig.from_dict({"method": "streaming", "sink": 3, "window": 10})
    calls = []

    def dense_kernel(q, out, plan):  # stands in for the engine's op: lcx's own dense kernel, recorded
        calls.append((plan.lens, plan.engine))
        from lcx_plugin.kernels.paged import paged_attention

        paged_attention(q, problem.kv, plan, problem.scale, out, impl="torch")

    step = plan_step(config.selector, problem.plan, ("a", "b", "c", "d"), dense_engine_data=lambda plan: "meta")
    assert step.dense_rows == [False, True, False, False]
    assert step.sparse_request_ids == ("a", "c", "d")
    core = LayerCore(0, 6, 2, 64, problem.scale, config, "torch")
    out = torch.full_like(problem.query, float("nan"))
    core.run(problem.query, problem.kv, step, out, dense_kernel)
    assert calls == [((9,), "meta")]  # the dense sequence alone, with the engine data made once per step
    ctx = SelectContext(layer=0, query=problem.query, kv=problem.kv, plan=problem.plan,
                        request_ids=("a", "b", "c", "d"), num_heads=6)
    sel = config.selector.select(ctx)  # the same window over the whole batch: the reference's oracle
    expected = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, sel)
    assert not torch.isnan(out).any()
    assert (out.double() - expected).abs().max() < 2e-4


def test_all_dense_step_uses_the_dense_kernel_on_the_whole_batch_without_copies():
    problem = make_problem([9, 5], [9, 1], 4, 2, block_size=8, seed=1)
    config = LcxConfig.from_dict({"method": "streaming", "sink": 4, "window": 64})
    step = plan_step(config.selector, problem.plan, ("a", "b"))
    assert step.dense is problem.plan and step.sparse is None and step.dense_token_rows is None
    seen = []
    core = LayerCore(0, 4, 2, 64, problem.scale, config, "torch")
    out = torch.empty_like(problem.query)
    core.run(problem.query, problem.kv, step, out, lambda q, o, plan: seen.append(o.data_ptr()))
    assert seen == [out.data_ptr()]  # the engine writes straight into the caller's output


def test_write_updates_page_summaries_only_when_the_selector_asks():
    problem = make_problem([9], [9], 4, 2, block_size=8, seed=2)
    core = LayerCore(0, 4, 2, 64, problem.scale, LcxConfig(), "torch")
    k = torch.randn(1, 2, 64)
    core.write(problem.kv, k, k, torch.tensor([0]))
    assert core.pages is None
    assert torch.equal(problem.kv.token(0, 0, 0)[0], k[0, 0])


def test_a_step_builds_its_query_positions_once_for_every_layer():
    """Position-neutral summaries need each row's absolute position at every layer's write: the
    step computes them once (a chunk after a prefix, a decode row, a whole prompt)."""
    problem = make_problem([60, 9, 70], [12, 1, 70], 6, 2, block_size=8, seed=3, fmt="plain")
    step = plan_step(LcxConfig.from_dict({"method": "dense"}).selector, problem.plan, ("a", "b", "c"))
    expected = torch.cat([torch.arange(48, 60), torch.tensor([8]), torch.arange(70)])
    assert torch.equal(step.positions, expected)
    assert step.positions is step.positions


def test_an_extrapolating_layer_reads_compacted_positions_on_either_kernel(monkeypatch):
    """``extrapolate``: the layer hands its selection and RoPE to the kernel it was given (Triton
    here in the interpreter, as on a GPU), and to the torch twin where Triton cannot turn the
    format's keys (Hadamard-rotated int4 pages); both give the twin's compacted attention."""
    from lcx_plugin.kernels.paged import triton_impl
    from lcx_plugin.kernels.paged.rope import Rope

    turned = []
    kernel = triton_impl.paged_attention_triton
    monkeypatch.setattr(triton_impl, "paged_attention_triton", lambda *a, **kw: turned.append(a[-1]) or kernel(*a, **kw))
    rope = Rope.standard(64)
    config = LcxConfig.from_dict({"method": "streaming", "sink": 4, "window": 16, "extrapolate": True})
    for fmt in ("plain", "int4-g0-rot"):
        problem = make_problem([90, 50], [1, 20], 4, 2, block_size=8, seed=5, fmt=fmt)
        step = plan_step(config.selector, problem.plan, ("a", "b"))
        outs = {}
        for impl in ("triton", "torch"):
            core = LayerCore(0, 4, 2, 64, problem.scale, config, impl, rope=rope)
            outs[impl] = core.run(problem.query, problem.kv, step, torch.full_like(problem.query, float("nan")))
        assert (outs["triton"] - outs["torch"]).abs().max() < 1e-5, fmt
        unmoved = LayerCore(0, 4, 2, 64, problem.scale, LcxConfig.from_dict({"method": "streaming", "sink": 4,
                                                                             "window": 16}), "torch")
        plain = unmoved.run(problem.query, problem.kv, step, torch.empty_like(problem.query))
        assert (plain - outs["torch"]).abs().max() > 1e-3, f"{fmt}: nothing moved"
    assert turned == [rope], "the Triton kernel read the plain pages' compacted positions, the twin the int4 ones"


def test_a_layer_promotes_its_steps_tokens_on_mixed_pages_before_attending():
    """Mixed-precision pages: ``write`` stores int4 rows, ``run`` gives the step's tokens their int8
    slots from its own queries (``observed_importance``) before any kernel reads them."""
    from lcx_plugin.kernels.paged import mixed

    q_lens, seq_lens, hq, hkv, d, bs = [40, 1], [40, 25], 4, 2, 64, 16
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    blank = make_problem(seq_lens, [0, 0], hq, hkv, block_size=bs, fmt="mixed-g0")  # only the layout and table
    kv = blank.kv
    kv.offsets.fill_(-1)
    table = blank.plan.block_table
    from lcx_plugin.kernels.paged import BatchPlan

    plan = BatchPlan.from_lists(q_lens, seq_lens, table)
    positions = plan.positions()
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor(q_lens))
    slots = table[seq, positions // bs].long() * bs + positions % bs
    t = sum(q_lens)
    key, value, query = torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g), \
        torch.randn(t, hq, d, generator=g)
    config = LcxConfig.from_dict({"method": "dense", "kernel": "torch", "kv_format": "mixed"})
    core = LayerCore(0, hq, hkv, d, blank.scale, config, "torch")
    core.write(kv, key, value, slots)
    assert not (kv.offsets >= 0).any()  # written at int4 only, until the step runs
    step = plan_step(config.selector, plan, ("a", "b"))
    out = torch.full_like(query, float("nan"))
    core.run(query, kv, step, out)
    importance = mixed.observed_importance(query, key, plan, blank.scale)
    first = int(table[0, 0])
    for h in range(hkv):
        held = {int(o) for o in kv.offsets[first, h] if o >= 0}
        assert held >= {0, 1, 2, 3}, held  # the sinks
    assert (kv.offsets >= 0).sum() > 0 and importance[40].tolist() == [0.0, 0.0]
    expected = paged_attention_reference(query, kv, plan, blank.scale)
    assert (out.double() - expected).abs().max() < 2e-4


def _own_rows(problem):
    """Each decode row's own key and value ``[B, Hkv, D]``, as the step wrote them (read back from
    the cache at the sequence's last position)."""
    plan, kv = problem.plan, problem.kv
    keys, values = [], []
    for b, n in enumerate(plan.lens):
        block, offset = int(plan.block_table[b, (n - 1) // kv.block_size]), (n - 1) % kv.block_size
        kv_pairs = [kv.token(block, h, offset) for h in range(kv.num_kv_heads)]
        keys.append(torch.stack([k for k, _ in kv_pairs]).float())
        values.append(torch.stack([v for _, v in kv_pairs]).float())
    return torch.stack(keys), torch.stack(values)


@pytest.mark.parametrize("fmt", ["plain", "vllm-cpu-vec", "int8-g0"])
def test_a_streaming_decode_step_reads_sinks_and_window_without_a_selection(fmt, monkeypatch):
    """Decode rows of a window-only method, with the step's own keys given, go through the window
    kernel (no selection is built) and attend as the reference does over the window selection;
    the short sequence stays on the dense kernel."""
    problem = make_problem([70, 9, 45, 33], [1, 1, 1, 1], 6, 2, block_size=8, seed=5, fmt=fmt)
    config = LcxConfig.from_dict({"method": "streaming", "sink": 3, "window": 10})
    ctx = SelectContext(layer=0, query=problem.query, kv=problem.kv, plan=problem.plan,
                        request_ids=("a", "b", "c", "d"), num_heads=6)
    expected = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale,
                                         config.selector.select(ctx))
    step = plan_step(config.selector, problem.plan, ("a", "b", "c", "d"))
    assert step.dense_rows == [False, True, False, False]
    core = LayerCore(0, 6, 2, 64, problem.scale, config, "torch")
    monkeypatch.setattr(type(config.selector), "select", lambda self, ctx: pytest.fail("a selection was built"))
    key, value = _own_rows(problem)
    out = torch.full_like(problem.query, float("nan"))
    core.run(problem.query, problem.kv, step, out, key=key, value=value)
    assert not torch.isnan(out).any()
    assert (out.double() - expected).abs().max() < 2e-3


def test_without_the_steps_own_keys_a_streaming_decode_step_selects_as_before(monkeypatch):
    problem = make_problem([70, 45], [1, 1], 4, 2, block_size=8, seed=6)
    config = LcxConfig.from_dict({"method": "streaming", "sink": 3, "window": 10})
    step = plan_step(config.selector, problem.plan, ("a", "b"))
    core = LayerCore(0, 4, 2, 64, problem.scale, config, "torch")
    built = []
    original = type(config.selector).select
    monkeypatch.setattr(type(config.selector), "select", lambda self, ctx: built.append(1) or original(self, ctx))
    core.run(problem.query, problem.kv, step, torch.empty_like(problem.query))
    assert built == [1]
