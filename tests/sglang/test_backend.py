"""lcx as an SGLang attention backend, on SGLang's real ReqToTokenPool, MHATokenToKVPool,
RadixAttention and ForwardBatch (CPU): extend with prefixes and decode over a ragged batch,
against a float64 SDPA reference, for dense and for methods that select."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from lcx_plugin.attention_backends.sglang import plugin
from lcx_plugin.attention_backends.sglang.backend import LcxSglangBackend

HQ, HKV, D, LAYERS, SLOTS = 6, 2, 16, 2, 2048


class Engine:
    """SGLang's pools with requests admitted at random, permuted slots."""

    def __init__(self, page_size: int = 1, seed: int = 0, hq: int = HQ, hkv: int = HKV):
        """``hq``/``hkv``: the heads this process holds (a tensor-parallel rank holds a share)."""
        self.gen = torch.Generator().manual_seed(seed)
        self.page_size = page_size
        self.req_pool = ReqToTokenPool(size=8, max_context_len=512, device="cpu", enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(size=SLOTS, page_size=page_size, dtype=torch.float32, head_num=hkv,
                                        head_dim=D, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
        self.layers = [RadixAttention(hq, D, 1 / math.sqrt(D), hkv, layer_id=i) for i in range(LAYERS)]
        pages = (torch.randperm(SLOTS // page_size - 1, generator=self.gen) + 1).tolist()  # page 0: padding
        self.free = pages
        self.history: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # row -> per-layer K, V

    def runner(self, model_config=None):
        return SimpleNamespace(req_to_token_pool=self.req_pool, token_to_kv_pool=self.kv_pool, device="cpu",
                               page_size=self.page_size, model_config=model_config)

    def admit(self, row: int, length: int) -> None:
        p = self.page_size
        pages = [self.free.pop() for _ in range(-(-length // p))]
        slots = torch.tensor([pg * p + i for pg in pages for i in range(p)][:length], dtype=torch.int32)
        self.req_pool.req_to_token[row, :length] = slots

    def batch(self, rows, prefix_lens, new_lens, decode: bool) -> ForwardBatch:
        seq = [a + b for a, b in zip(prefix_lens, new_lens)]
        loc = torch.cat([self.req_pool.req_to_token[r, a:s].long() for r, a, s in zip(rows, prefix_lens, seq)])
        n = int(loc.numel())
        fb = ForwardBatch(forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND, batch_size=len(rows),
                          input_ids=torch.zeros(n, dtype=torch.int64), req_pool_indices=torch.tensor(rows),
                          seq_lens=torch.tensor(seq), out_cache_loc=loc, seq_lens_sum=sum(seq))
        fb.seq_lens_cpu = torch.tensor(seq)
        fb.positions = torch.cat([torch.arange(a, b) for a, b in zip(prefix_lens, seq)])
        fb.rids = [f"req-{r}" for r in rows]
        if not decode:
            fb.extend_seq_lens = torch.tensor(new_lens, dtype=torch.int32)
            fb.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
            fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu = list(new_lens), list(prefix_lens)
        return fb

    def step(self, backend, rows, prefix_lens, new_lens, decode=False, mirror=None):
        """One forward over every layer: fresh q/k/v, lcx's output and the float64 reference's (or,
        with ``mirror``, the same inputs through lcx's layer core over a vLLM page layout)."""
        fb = self.batch(rows, prefix_lens, new_lens, decode)
        backend.init_forward_metadata(fb)
        if mirror is not None:
            mirror.plan(rows, prefix_lens, new_lens, fb.rids)
        outs, refs = [], []
        for layer in self.layers:
            n = sum(new_lens)
            q, k, v = (torch.randn(n, h, D, generator=self.gen) for h in (HQ, HKV, HKV))
            out = torch.full((n, HQ * D), float("nan"))
            out.copy_(backend.forward(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1), layer, fb))
            outs.append(out.view(n, HQ, D))
            if mirror is not None:
                refs.append(mirror.layer(layer.layer_id, q, k, v))
            else:
                refs.append(self._reference(layer.layer_id, rows, new_lens, q, k, v))
        return outs, refs

    def _reference(self, layer_id, rows, new_lens, q, k, v):
        out, start = [], 0
        for r, e in zip(rows, new_lens):
            ks, vs = self.history.setdefault(r, ([torch.zeros(0, HKV, D)] * LAYERS, [torch.zeros(0, HKV, D)] * LAYERS))
            ks[layer_id] = torch.cat([ks[layer_id], k[start:start + e]])
            vs[layer_id] = torch.cat([vs[layer_id], v[start:start + e]])
            keep = None if self.keep is None else (lambda qp, kp, i=layer_id: self.keep(i, qp, kp))
            out.append(reference(q[start:start + e], ks[layer_id], vs[layer_id], keep))
            start += e
        return torch.cat(out)

    keep = None  # (layer, query positions, key positions) -> kept [Hq or 1, t, s], for methods that select


def reference(q, k, v, keep=None):
    """float64 causal attention of q (the last rows) over k, v, GQA by repetition."""
    t, s = q.shape[0], k.shape[0]
    g = HQ // HKV
    q64, k64, v64 = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = torch.einsum("thd,shd->hts", q64, k64) / math.sqrt(D)
    qpos = torch.arange(s - t, s)[:, None]
    kpos = torch.arange(s)[None, :]
    mask = kpos <= qpos
    if keep is not None:
        mask = mask & keep(qpos, kpos)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v64).float()


def backend_for(monkeypatch, engine, config, model_config=None) -> LcxSglangBackend:
    monkeypatch.setenv("LCX_CONFIG", json.dumps(config))
    return LcxSglangBackend(engine.runner(model_config))


def model_config(context_len=512, trained=512, rope_scaling=None, architecture="LlamaForCausalLM"):
    """The fields of SGLang's ``ModelConfig`` lcx reads, for a Llama-style model with this pool's heads."""
    text = SimpleNamespace(max_position_embeddings=trained, rope_theta=10000.0, rope_scaling=rope_scaling)
    return SimpleNamespace(hf_config=SimpleNamespace(architectures=[architecture]), hf_text_config=text,
                           context_len=context_len, model_path="/models/tiny-llama", model_override_args={})


class VllmLayout:
    """The same config through lcx's layer core the way the vLLM adapter drives it: vLLM's page
    layout (``formats.plain``, blocks of 16 at permuted places), its own per-request state."""

    BLOCK = 16

    def __init__(self, blocks: int = 64, seed: int = 1, rope=None):
        from lcx_plugin.config import resolve_config
        from lcx_plugin.head_patterns import ModelShape
        from lcx_plugin.kernels.paged import formats
        from lcx_plugin.layer import LayerCore
        from lcx_plugin.selectors import LayerInfo
        from lcx_plugin.state import RequestStates

        self.config = resolve_config(None)
        self.kv = [formats.plain(torch.zeros(blocks, HKV, self.BLOCK, 2 * D)) for _ in range(LAYERS)]
        requests = RequestStates()
        shape = ModelShape(LAYERS, HKV, D, None)
        self.cores = [LayerCore(i, HQ, HKV, D, 1 / math.sqrt(D), self.config, "torch", requests,
                                LayerInfo(i, HKV, D, shape), rope) for i in range(LAYERS)]
        self.free = (torch.randperm(blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
        self.tables: dict[int, list[int]] = {}

    def plan(self, rows, prefix_lens, new_lens, rids):
        from lcx_plugin.kernels.paged import BatchPlan
        from lcx_plugin.layer import plan_step

        seq = [a + b for a, b in zip(prefix_lens, new_lens)]
        for r, n in zip(rows, seq):
            table = self.tables.setdefault(r, [])
            while len(table) * self.BLOCK < n:
                table.append(self.free.pop())
        width = max(len(self.tables[r]) for r in rows)
        table = torch.tensor([self.tables[r] + [0] * (width - len(self.tables[r])) for r in rows], dtype=torch.int32)
        self.slots = torch.tensor([self.tables[r][t // self.BLOCK] * self.BLOCK + t % self.BLOCK
                                   for r, a, n in zip(rows, prefix_lens, seq) for t in range(a, n)])
        self.step = plan_step(self.config.selector, BatchPlan.from_lists(list(new_lens), seq, table), tuple(rids))

    def layer(self, index, q, k, v):
        core = self.cores[index]
        core.write(self.kv[index], k, v, self.slots, positions=self.step.positions)
        out = torch.full_like(q, float("nan"))
        core.run(q, self.kv[index], self.step, out)
        return out


def run_conversation(backend, engine, mirror=None):
    """Three requests: prefill in two chunks (the second with a prefix), then decode steps, with a
    request joining late: every step's outputs and references."""
    rows, lens = [1, 4, 6], [37, 5, 90]
    for r, n in zip(rows, lens):
        engine.admit(r, n + 6)
    yield engine.step(backend, rows, [0, 0, 0], [20, 5, 33], mirror=mirror)
    yield engine.step(backend, rows, [20, 5, 33], [17, 0, 57], mirror=mirror)  # a chunk over a prefix; one row idle
    done = list(lens)
    for _ in range(3):
        yield engine.step(backend, rows, done, [1, 1, 1], decode=True, mirror=mirror)
        done = [d + 1 for d in done]


@pytest.mark.parametrize("page_size", [1, 4])
def test_dense_extend_and_decode_match_float64(monkeypatch, page_size):
    engine = Engine(page_size)
    backend = backend_for(monkeypatch, engine, {"method": "dense"})
    for outs, refs in run_conversation(backend, engine):
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4)


def test_streaming_attends_sinks_and_window(monkeypatch):
    engine = Engine()
    sink, window = 4, 8
    engine.keep = lambda layer, qp, kp: (kp < sink) | (kp > qp - window)
    backend = backend_for(monkeypatch, engine, {"method": "streaming", "sink": sink, "window": window})
    for outs, refs in run_conversation(backend, engine):
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4)


FULL_BUDGET = {
    "token_select": {"method": "token_select", "budget": 1.0, "sink": 4, "window": 8, "reuse_similarity": None},
    "token_select_prefill": {"method": "token_select", "budget": 1.0, "sink": 4, "window": 8, "prefill": "select",
                             "query_block": 16},
    "hip": {"method": "hip", "budget": 1.0, "sink": 4, "window": 8, "dense_layers": [], "query_block": 16,
            "refresh_every": 1},
    "streaming": {"method": "streaming", "sink": 4, "window": 4096},
}


@pytest.mark.parametrize("name", sorted(FULL_BUDGET))
def test_each_method_at_full_budget_equals_dense(monkeypatch, name):
    engine = Engine()
    backend = backend_for(monkeypatch, engine, FULL_BUDGET[name])
    for outs, refs in run_conversation(backend, engine):
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4)


def test_request_state_is_dropped_when_a_pool_row_changes_hands(monkeypatch):
    engine = Engine()
    backend = backend_for(monkeypatch, engine, {"method": "token_select", "budget": 8, "sink": 2, "window": 4})
    engine.admit(3, 40)
    engine.step(backend, [3], [0], [39])
    engine.step(backend, [3], [39], [1], decode=True)
    assert "req-3" in backend.requests
    fb = engine.batch([3], [0], [10], decode=False)
    fb.rids = ["another"]
    backend.init_forward_metadata(fb)
    assert "req-3" not in backend.requests


def test_bad_config_is_one_clear_error(monkeypatch):
    engine = Engine()
    with pytest.raises(ValueError, match="kv_format 'int8' is not wired"):
        backend_for(monkeypatch, engine, {"method": "dense", "kv_format": "int8"})
    with pytest.raises(ValueError, match="budget"):
        backend_for(monkeypatch, engine, {"method": "token_select", "budget": -3})


def test_plugin_registers_backend_and_argument_choice():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    plugin.register()
    plugin.register()  # idempotent
    assert ATTENTION_BACKEND_CHOICES.count("lcx") == 1
    assert ATTENTION_BACKENDS["lcx"] is plugin.create_backend


def test_sglang_loads_the_plugin_and_parses_the_backend_flags():
    """In a fresh process, as SGLang's launcher does it: load_plugins() through the entry point,
    then SGLang's own argument parser accepts lcx for attention, prefill and decode."""
    import subprocess
    import sys

    code = """
from sglang.srt.plugins import load_plugins
load_plugins()
import argparse
from sglang.srt.server_args import ServerArgs
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
args = parser.parse_args(["--model-path", "m", "--attention-backend", "lcx", "--prefill-attention-backend", "lcx",
                          "--decode-attention-backend", "lcx"])
assert (args.attention_backend, args.prefill_attention_backend, args.decode_attention_backend) == ("lcx",) * 3
print("factory", ATTENTION_BACKENDS["lcx"].__module__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "factory lcx_plugin.attention_backends.sglang.plugin" in done.stdout


def test_head_split_streams_the_pattern_s_heads(monkeypatch, tmp_path):
    """Retrieval heads attend to everything, streaming heads (scores under the threshold) to sinks +
    window; the pattern is a file in lcx's format for this pool's shape."""
    from lcx_plugin.head_patterns import HeadPattern, ModelShape

    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    path = HeadPattern(scores, ModelShape(LAYERS, HKV, D, "test")).save(tmp_path / "pattern.json")
    sink, window = 4, 8
    engine = Engine()
    group = HQ // HKV

    def keep(layer, qp, kp):
        stream = (kp < sink) | (kp > qp - window)
        full = torch.ones_like(stream)
        return torch.stack([stream if scores[layer, h // group] < 0.5 else full for h in range(HQ)])

    engine.keep = keep
    backend = backend_for(monkeypatch, engine, {"method": "head_split", "pattern": str(path), "threshold": 0.5,
                                                "sink": sink, "window": window})
    for outs, refs in run_conversation(backend, engine):
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4)


def test_kv_writes_land_in_the_pool_slots_sglang_gave(monkeypatch):
    engine = Engine(page_size=4)
    backend = backend_for(monkeypatch, engine, {"method": "dense"})
    engine.admit(2, 12)
    fb = engine.batch([2], [0], [12], decode=False)
    backend.init_forward_metadata(fb)
    layer = engine.layers[1]
    k, v = torch.randn(12, HKV, D), torch.randn(12, HKV, D)
    backend.forward(torch.randn(12, HQ * D), k.reshape(12, -1), v.reshape(12, -1), layer, fb)
    slots = engine.req_pool.req_to_token[2, :12].long()
    assert torch.equal(engine.kv_pool.get_key_buffer(1)[slots], k)
    assert torch.equal(engine.kv_pool.get_value_buffer(1)[slots], v)
    untouched = torch.ones(SLOTS + 4, dtype=torch.bool)
    untouched[slots] = False
    assert not engine.kv_pool.get_key_buffer(0).any() and not engine.kv_pool.get_key_buffer(1)[untouched].any()


def test_filtered_out_by_sglang_plugins_the_error_is_sglang_s_own():
    import subprocess
    import sys

    code = """
from sglang.srt.plugins import load_plugins
load_plugins()
import argparse
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
parser.parse_args(["--model-path", "m", "--attention-backend", "lcx"])
"""
    import os

    env = {**os.environ, "SGLANG_PLUGINS": "some-other-plugin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "argument --attention-backend: invalid choice: 'lcx'" in done.stderr, done.stderr[-3000:]


COMPRESSED = {
    "token_select": {"method": "token_select", "budget": 12, "sink": 2, "window": 4, "reuse_similarity": 0.5},
    "token_select_pages": {"method": "token_select", "budget": 32, "granularity": "page", "sink": 2, "window": 4},
    # Prompt chunks select too (query blocks of 16 rows).
    "token_select_prefill": {"method": "token_select", "budget": 12, "sink": 2, "window": 4, "reuse_similarity": 0.5,
                             "prefill": "select", "query_block": 16},
    "hip": {"method": "hip", "budget": 32, "sink": 4, "window": 8, "dense_layers": [], "query_block": 16,
            "refresh_every": 2},
    "streaming": {"method": "streaming", "sink": 4, "window": 8},
}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_methods_select_as_on_the_vllm_path(monkeypatch, name):
    """At budgets that leave tokens out, the same inputs give the same output through SGLang's pool
    (pages of 16) as through lcx's layer core over vLLM's page layout: the same selections."""
    engine = Engine(page_size=VllmLayout.BLOCK)
    backend = backend_for(monkeypatch, engine, COMPRESSED[name])
    mirror = VllmLayout()
    for outs, refs in run_conversation(backend, engine, mirror):
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)
    assert backend.requests.counters == mirror.cores[1].requests.counters  # the selection cache's counts too


EXTRAPOLATING = {
    "streaming": {"method": "streaming", "sink": 4, "window": 8, "extrapolate": True},
    "hip": {**COMPRESSED["hip"], "extrapolate": True},
    "token_select_prefill": {**COMPRESSED["token_select_prefill"], "extrapolate": True},
}


@pytest.mark.parametrize("name", sorted(EXTRAPOLATING))
def test_extrapolating_methods_read_compacted_positions_as_on_the_vllm_path(monkeypatch, name):
    """``extrapolate`` on SGLang: the RoPE read from the model's config, selections position-neutral
    (HiP's page summaries from each key's position in the batch), attention at compacted positions:
    the same outputs as the layer core over vLLM's page layout with the same RoPE, and not the
    outputs of the same method at absolute positions."""
    from lcx_plugin.extrapolation import rope_from_config

    mc = model_config()
    rope = rope_from_config(mc.hf_text_config, D, "LlamaForCausalLM")
    runs = {}
    for extrapolate in (True, False):
        config = {**EXTRAPOLATING[name], "extrapolate": extrapolate}
        engine = Engine(page_size=VllmLayout.BLOCK)
        backend = backend_for(monkeypatch, engine, config, mc)
        mirror = VllmLayout(rope=rope if extrapolate else None)
        steps = list(run_conversation(backend, engine, mirror))
        for outs, refs in steps:
            for o, r in zip(outs, refs):
                torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)
        runs[extrapolate] = steps
    moved = max((a - b).abs().max().item() for (outs_a, _), (outs_b, _) in zip(runs[True], runs[False])
                for a, b in zip(outs_a, outs_b))
    assert moved > 1e-2, f"{name}: compacted positions changed nothing ({moved:.2g})"


def test_past_the_trained_length_only_an_extrapolating_method_starts(monkeypatch):
    engine = Engine()
    past = model_config(context_len=1024, trained=512)
    with pytest.raises(ValueError, match="--context-length 1024 is past tiny-llama's trained length of 512"):
        backend_for(monkeypatch, engine, {"method": "token_select", "budget": 12}, past)
    backend = backend_for(monkeypatch, engine, EXTRAPOLATING["streaming"], past)
    assert backend.rope is not None and backend.rope.rotary_dim == D
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        backend_for(monkeypatch, engine, EXTRAPOLATING["streaming"], model_config(rope_scaling={"rope_type": "yarn"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not among them"):
        backend_for(monkeypatch, engine, EXTRAPOLATING["streaming"], model_config(architecture="GPT2LMHeadModel"))
    with pytest.raises(ValueError, match="gave no model config"):
        backend_for(monkeypatch, engine, EXTRAPOLATING["streaming"])


TP = 2  # the pool's 2 KV heads (6 query heads) split over 2 ranks: one KV head and 3 query heads each


@pytest.mark.parametrize("name", ["head_split", "token_select", "token_select_prefill", "hip"])
def test_split_over_ranks_each_rank_computes_its_heads_as_one_process_does(monkeypatch, tmp_path, name):
    """tensor_parallel_size 2 as SGLang publishes it (``get_parallel()``): each rank's pool holds one
    KV head, and its backend serves that head's slice of the same inputs exactly as one process
    serves all heads, head-pattern rows and selections included. A rank that read pattern rows from
    head 0 (the placement before the split was wired) would stream the wrong heads."""
    from sglang.srt.runtime_context import get_parallel

    from lcx_plugin.head_patterns import HeadPattern, ModelShape

    if name == "head_split":  # KV head 1 streams in layer 0, KV head 0 in layer 1
        scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
        path = HeadPattern(scores, ModelShape(LAYERS, HKV, D, "test")).save(tmp_path / "pattern.json")
        config = {"method": "head_split", "pattern": str(path), "threshold": 0.5, "sink": 2, "window": 4}
    else:
        config = COMPRESSED[name]
    whole = Engine(page_size=4)
    ranks = [Engine(page_size=4, hq=HQ // TP, hkv=HKV // TP) for _ in range(TP)]
    one = backend_for(monkeypatch, whole, config)
    backends = []
    for r in range(TP):
        with get_parallel().override(tp_rank=r, tp_size=TP, attn_tp_rank=r, attn_tp_size=TP):
            backends.append(backend_for(monkeypatch, ranks[r], config))
    assert [b.kv_head_offset for b in backends] == [0, 1] and backends[1].model.num_kv_heads == HKV
    gen = torch.Generator().manual_seed(11)
    rows, lens = [1, 4], [70, 45]
    for e in (whole, *ranks):
        for r, n in zip(rows, lens):
            e.admit(r, n + 4)
    steps = [([0, 0], [40, 45], False), ([40, 45], [30, 0], False)] + \
            [([70 + i, 45 + i], [1, 1], True) for i in range(3)]
    hq, hkv = HQ // TP, HKV // TP
    for prefix, new, decode in steps:
        fbs = [e.batch(rows, prefix, new, decode) for e in (whole, *ranks)]
        for b, fb in zip((one, *backends), fbs):
            b.init_forward_metadata(fb)
        n = sum(new)
        for layer_id in range(LAYERS):
            q, k, v = (torch.randn(n, h, D, generator=gen) for h in (HQ, HKV, HKV))
            want = one.forward(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1), whole.layers[layer_id], fbs[0])
            want = want.view(n, HQ, D)
            for r in range(TP):
                got = backends[r].forward(q[:, r * hq:(r + 1) * hq].reshape(n, -1), k[:, r * hkv:(r + 1) * hkv].reshape(n, -1),
                                          v[:, r * hkv:(r + 1) * hkv].reshape(n, -1), ranks[r].layers[layer_id], fbs[1 + r])
                torch.testing.assert_close(got.view(n, hq, D), want[:, r * hq:(r + 1) * hq], atol=1e-6, rtol=1e-5,
                                           msg=lambda m, r=r, layer_id=layer_id: f"rank {r} layer {layer_id}: {m}")


def test_attention_split_otherwise_than_by_tensor_parallelism_is_refused(monkeypatch):
    from sglang.srt.runtime_context import get_parallel

    engine = Engine(hq=HQ // TP, hkv=HKV // TP)
    with get_parallel().override(tp_rank=0, tp_size=TP, attn_tp_rank=0, attn_tp_size=1):
        with pytest.raises(ValueError, match="data-parallel and context-parallel attention are not supported"):
            backend_for(monkeypatch, engine, {"method": "dense"})


def test_replicated_kv_heads_are_placed_as_the_engine_loads_them():
    """Fewer KV heads than ranks: each KV head serves ``tp / heads`` consecutive ranks (the shard
    SGLang's and vLLM's QKV loaders give a rank)."""
    from lcx_plugin.selectors.base import first_kv_head

    assert [first_kv_head(r, 6, 1, 3) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [first_kv_head(r, 2, 4, 8) for r in range(2)] == [0, 4]
    assert [first_kv_head(r, 3, 1, 3) for r in range(3)] == [0, 1, 2]


def test_no_config_serves_the_recommended_default(monkeypatch):
    """Without $LCX_CONFIG, SGLang serves lcx's default for the model: TokenSelect alone for a
    model with no shipped head pattern (a head split needs one)."""
    from lcx_plugin.config import LcxConfig
    from lcx_plugin.recommended import WITHOUT_PATTERN

    monkeypatch.delenv("LCX_CONFIG", raising=False)
    engine = Engine()
    backend = LcxSglangBackend(engine.runner(model_config()))
    assert backend.config == LcxConfig.from_dict(WITHOUT_PATTERN) and backend.config.method == "token_select"
    # The test's contexts stay below the default's min_context (2,048 tokens): dense, to float64.
    for outs, refs in run_conversation(backend, engine):
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4)
