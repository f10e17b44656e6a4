"""The ``lcx`` attention backend for SGLang: translation between SGLang and lcx's layer core.

``init_forward_metadata`` runs once per forward for all layers: it turns SGLang's batch (the
request pool's ``req_to_token`` rows, sequence and extend lengths) into lcx's ``StepPlan``.
``forward_extend`` / ``forward_decode`` write the step's keys and values into SGLang's own
``MHATokenToKVPool`` through its ``set_kv_buffer`` and hand the plan to the layer's ``LayerCore``,
which reads the pool through a strided view (``formats.token_pool``, no copy). No method logic
lives here.

What SGLang's pools do not allow yet, lcx refuses at construction with one clear error (quantized
pages) or says in the log (a head split's streaming heads keep their full KV here: the pool has one
buffer per layer for all heads); see the README's "SGLang". A context length past the model's
trained one is refused unless the method extrapolates (compacted positions, RoPE read from the
model's config; ``extrapolation.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcx_plugin.config import LcxConfig, is_default, resolve_config
from lcx_plugin.extrapolation import length_reasons, rope_from_config
from lcx_plugin.head_patterns import ModelShape
from lcx_plugin.kernels.paged import BatchPlan, KVFormat, formats
from lcx_plugin.kernels.paged.rope import Rope
from lcx_plugin.layer import LayerCore, StepPlan, plan_step
from lcx_plugin.log import get_logger
from lcx_plugin.selectors import LayerInfo
from lcx_plugin.selectors.base import first_kv_head
from lcx_plugin.state import RequestStates

from . import compat

logger = get_logger()


def rope_for(facts: dict, head_dim: int) -> Rope:
    return rope_from_config(facts["text_config"], head_dim, facts["architecture"])


def check_config(config: LcxConfig, model: ModelShape, split: dict, facts: dict | None = None,
                 page_size: int = 1) -> list[str]:
    """Why this config cannot be served through SGLang's pools (empty: it can). ``split``:
    ``compat.attention_split()``; ``facts``: ``compat.model_facts`` of the served model (None: no
    model config, as in pool-only tests)."""
    reasons = list(config.selector.check_model(model))
    if config.quantized:
        reasons.append(f"lcx config: kv_format {config.kv_format!r} is not wired into SGLang's MHATokenToKVPool yet "
                       "(its buffers hold the model dtype); use kv_format 'auto' with SGLang")
    if facts is not None:
        reasons += length_reasons(config.selector, max_len=facts["context_len"], trained=facts["trained"],
                                  model_name=facts["name"], block_size=page_size, length_flag="--context-length",
                                  read_rope=lambda: rope_for(facts, model.head_dim))
    elif getattr(config.selector, "extrapolate", False):
        reasons.append("lcx config: 'extrapolate' re-applies the model's RoPE, and SGLang gave no model config to read "
                       "it from")
    try:
        config.implementation("cpu", engine_op=False)
    except ValueError as e:
        reasons.append(str(e))
    if split["attn_tp_size"] != split["tp_size"] or split["dcp_size"] > 1:
        reasons.append(f"lcx's SGLang adapter splits attention heads over the tensor-parallel group only; this "
                       f"process's attention is also split otherwise (tp_size {split['tp_size']}, attention tp_size "
                       f"{split['attn_tp_size']}, decode context parallel {split['dcp_size']}): data-parallel "
                       "and context-parallel attention are not supported yet")
    return reasons


@dataclass
class LcxSglangMetadata:
    step: StepPlan


class LcxSglangBackend(compat.attention_backend_base()):
    def __init__(self, model_runner) -> None:
        super().__init__()
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.device = torch.device(getattr(model_runner, "device", "cpu"))
        self.page_size = int(getattr(model_runner, "page_size", 1) or 1)
        pool = self.token_to_kv_pool
        model_config = getattr(model_runner, "model_config", None)
        facts = compat.model_facts(model_config) if model_config is not None else None
        # $LCX_CONFIG, else the recommended default for the model; raises LcxConfigError on bad input
        self.config = resolve_config(None, model=facts["name"] if facts else None, engine="sglang")
        # Under tensor parallelism the pool holds this rank's KV heads; head patterns are indexed by
        # the model's global KV heads, so the model shape and this rank's first head come from the
        # model config and SGLang's published split (the same placement as vLLM's).
        split = compat.attention_split()
        total = compat.total_kv_heads(model_config) or pool.head_num * split["tp_size"]
        self.model = ModelShape(pool.layer_num, total, pool.head_dim, facts["name"] if facts else None)
        self.kv_head_offset = first_kv_head(split["tp_rank"], split["tp_size"], pool.head_num, total)
        reasons = check_config(self.config, self.model, split, facts, self.page_size)
        if reasons:
            raise ValueError("lcx cannot serve this SGLang model: " + "; ".join(reasons))
        self.impl = self.config.implementation(self.device, engine_op=False)
        # Compacted positions: the model's RoPE, re-applied to what each query reads.
        self.rope = rope_for(facts, pool.head_dim) if getattr(self.config.selector, "extrapolate", False) else None
        if getattr(self.config.selector, "stores_apart", False):
            logger.warning("lcx head_split on SGLang: streaming heads attend to sinks + window, but their KV is not "
                           "stored apart (SGLang's pool keeps one buffer per layer), so no memory is saved")
        self.requests = RequestStates()
        self.cores: dict[int, LayerCore] = {}
        self._slot_owner: dict[int, str] = {}  # request-pool row -> request id holding it
        self._row_of: dict[str, int] = {}  # and back
        self._formats: dict[int, tuple[int, KVFormat]] = {}  # layer -> (key buffer address, its view)
        self.forward_metadata: LcxSglangMetadata | None = None
        logger.info("lcx attention active in SGLang: method=%s kernel=%s page_size=%d tp rank %d of %d (KV heads "
                    "%d..%d of %d) config: %s", self.config.method, self.impl, self.page_size, split["tp_rank"],
                    split["tp_size"], self.kv_head_offset, self.kv_head_offset + pool.head_num - 1, total,
                    self.config.describe())
        if is_default(None):
            logger.info("lcx: $LCX_CONFIG is not set, so this is lcx's recommended default; LCX_CONFIG="
                        "'{\"method\": \"dense\"}' serves the stock arithmetic")

    # -- once per forward ------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        fb = forward_batch
        mode = fb.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        seq_lens = (fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()).tolist()
        if mode.is_decode():
            q_lens = [1] * len(seq_lens)
        elif mode.is_extend():
            q_lens = list(fb.extend_seq_lens_cpu) if fb.extend_seq_lens_cpu is not None else fb.extend_seq_lens.tolist()
        else:
            raise NotImplementedError(f"lcx's SGLang backend serves extend and decode, not {mode}")
        batch = BatchPlan.from_lists(q_lens, seq_lens, self._block_table(fb.req_pool_indices, max(seq_lens, default=0)))
        self.forward_metadata = LcxSglangMetadata(plan_step(self.config.selector, batch, self._request_ids(fb)))

    def _block_table(self, req_pool_indices: torch.Tensor, max_len: int) -> torch.Tensor:
        """Each request's pages: its ``req_to_token`` row (pool slots), one slot per page start."""
        rows = self.req_to_token_pool.req_to_token.index_select(0, req_pool_indices.long())
        p = self.page_size
        return (rows[:, : max(max_len, 1): p] // p).to(torch.int32)

    def _request_ids(self, fb) -> tuple[str, ...]:
        """Stable ids for per-request state. A request-pool row that now holds another request, or a
        request that moved to another row (it was retracted and re-admitted), starts clean."""
        rows = fb.req_pool_indices.tolist()
        rids = list(fb.rids) if getattr(fb, "rids", None) else [f"row-{r}" for r in rows]
        stale = set()
        for row, rid in zip(rows, rids):
            owner = self._slot_owner.get(row)
            if owner == rid:
                continue
            if owner is not None:
                stale.add(owner)
                del self._row_of[owner]
            old_row = self._row_of.get(rid)
            if old_row is not None:
                stale.add(rid)
                del self._slot_owner[old_row]
            self._slot_owner[row], self._row_of[rid] = rid, row
        if stale:
            self.requests.drop(stale)
        return tuple(rids)

    # -- per layer -------------------------------------------------------------------------------
    def _core(self, layer) -> LayerCore:
        core = self.cores.get(layer.layer_id)
        if core is None:
            info = LayerInfo(layer.layer_id, layer.tp_k_head_num, layer.head_dim, self.model, self.kv_head_offset)
            core = LayerCore(layer.layer_id, layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim,
                             float(layer.scaling), self.config, self.impl, self.requests, info, self.rope)
            self.cores[layer.layer_id] = core
        return core

    def _kv(self, layer_id: int) -> KVFormat:
        """The layer's view of the pool (rebuilt only if the pool's buffer moves)."""
        pool = self.token_to_kv_pool
        k_buf = pool.get_key_buffer(layer_id)
        cached = self._formats.get(layer_id)
        if cached is None or cached[0] != k_buf.data_ptr():
            cached = (k_buf.data_ptr(), formats.token_pool(k_buf, pool.get_value_buffer(layer_id), self.page_size))
            self._formats[layer_id] = cached
        return cached[1]

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool):
        unsupported = {
            "cross attention": layer.is_cross_attention,
            "sliding window": layer.sliding_window_size is not None and layer.sliding_window_size > -1,
            "logit cap": bool(getattr(layer, "logit_cap", 0)),
            "different q/k and v head sizes": layer.qk_head_dim != layer.v_head_dim,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise NotImplementedError(f"lcx attention does not support {bad} yet")
        core = self._core(layer)
        kv = self._kv(layer.layer_id)
        if save_kv_cache and k is not None and v is not None:
            pool = self.token_to_kv_pool

            def engine_write(key, value, slots):
                pool.set_kv_buffer(layer, compat.kv_write_loc(slots), key, value)

            positions = forward_batch.positions if core.summaries_need_positions else None
            core.write(kv, k.view(-1, layer.tp_k_head_num, layer.head_dim),
                       v.view(-1, layer.tp_v_head_num, layer.v_head_dim), forward_batch.out_cache_loc, engine_write,
                       positions)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.head_dim)
        out = torch.empty_like(q3)
        own = (None, None)  # the step's own keys and values: a window-only method's decode reads just those
        if k is not None and v is not None:
            own = (k.view(-1, layer.tp_k_head_num, layer.head_dim), v.view(-1, layer.tp_v_head_num, layer.v_head_dim))
        core.run(q3, kv, self.forward_metadata.step, out, None, None, *own)
        return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    # -- CUDA graphs -----------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise NotImplementedError("lcx's SGLang backend plans on the host every step; run SGLang with "
                                  "--disable-cuda-graph")

    def get_cuda_graph_seq_len_fill_value(self):
        return 1
