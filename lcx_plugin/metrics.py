"""lcx's series on the engine's own ``/metrics``.

Attention runs in the engine's worker process; the API server answers ``/metrics``. The path
between them is prometheus-client's multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` names an
empty directory before the server starts, every process writes its metric values to files there,
and vLLM's ``/metrics`` collects the whole directory (``vllm/v1/metrics/prometheus.py``). lcx
defines its metrics in the worker only then; without the variable nothing is recorded and nothing
costs time. No second port, no patch.

Units (the README's "Metrics" section documents each series):

- *held* / *attended*: per engine step, for the newest query token of each sequence, on every
  KV head of every lcx layer: the tokens in the sequence's context, and the ones that query
  attends (sinks, window and selected tokens, counted once). Their ratio is the fraction of the
  KV cache a method reads.
- *fallbacks*: sequence-steps a selecting method served dense, by reason.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import torch

from lcx_plugin.log import get_logger

if TYPE_CHECKING:
    from lcx_plugin.config import LcxConfig
    from lcx_plugin.kernels.paged import BatchPlan, Selection
    from lcx_plugin.layer import StepPlan

ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The selection-cache counters selectors keep in ``RequestStates.counters``: lookups, hits.
CACHE_LOOKUPS = ("selection_lookups", "hip_searches", "hip_reuses")
CACHE_HITS = ("selection_hits", "hip_reuses")


def config_hash(config: "LcxConfig") -> str:
    """A short, stable fingerprint of the active config (the info series' label)."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def attended_by_newest(plan: "BatchPlan", selection: "Selection | None", block_size: int) -> torch.Tensor:
    """``[B, Hkv]`` int64: how many keys the newest query row of each sequence attends under
    ``selection`` (None: dense). Matches ``Selection.candidates`` for that row, vectorised."""
    lens = torch.tensor(plan.lens, dtype=torch.int64)
    if selection is None:
        return lens[:, None]
    b, h = selection.sink.shape
    pos = lens - 1  # the newest query's position
    span = int(lens.max()) if b else 0
    at = torch.arange(span)
    keep = (at[None, None, :] < selection.sink.cpu().long()[:, :, None]) \
        | (at[None, None, :] > (pos[:, None] - selection.window.cpu().long())[:, :, None])
    q_lens = [plan.q_len(i) for i in range(b)]
    blocks = torch.tensor([selection.query_block_of(q - 1) for q in q_lens], dtype=torch.int64)
    idx = selection.indices.cpu().long()[torch.arange(b), :, blocks]  # [B, Hkv, max_sel]
    cnt = selection.counts.cpu().long()[torch.arange(b), :, blocks]  # [B, Hkv]
    live = torch.arange(idx.shape[-1])[None, None, :] < cnt[:, :, None]
    if selection.granularity == "page":
        idx = (idx[..., None] * block_size + torch.arange(block_size)).flatten(-2)
        live = live[..., None].expand(-1, -1, -1, block_size).flatten(-2)
    idx = torch.where(live & (idx < span), idx, span)  # span: a spare column, dropped below
    listed = torch.zeros(b, h, span + 1, dtype=torch.bool)
    listed.scatter_(2, idx, True)
    keep |= listed[..., :span]
    keep &= at[None, None, :] <= pos[:, None, None]
    counts = keep.sum(-1)
    return torch.where(selection.dense.cpu(), lens[:, None], counts)


class Metrics:
    """The worker's lcx series (prometheus-client objects in multiprocess mode)."""

    def __init__(self, config: "LcxConfig") -> None:
        from prometheus_client import Counter, Gauge

        self.method = config.method
        m = self.method
        self._held = Counter("lcx_kv_tokens_held", "Context tokens held, per KV head and layer, for the newest "
                             "query of each sequence and step", ["method"]).labels(m)
        self._attended = Counter("lcx_kv_tokens_attended", "Context tokens those queries attended (sinks, window "
                                 "and selected tokens)", ["method"]).labels(m)
        self._lookups = Counter("lcx_selection_cache_lookups", "Selection-cache lookups (one per request, layer "
                                "and step where a method reuses selections)", ["method"]).labels(m)
        self._hits = Counter("lcx_selection_cache_hits", "Selection-cache lookups answered by a kept selection",
                             ["method"]).labels(m)
        self._fallbacks = Counter("lcx_dense_fallbacks", "Sequence-steps a selecting method served dense, by "
                                  "reason", ["method", "reason"])
        self._bytes = Gauge("lcx_kv_bytes_per_token", "KV-cache bytes one more context token costs, summed "
                            "over layers (streaming heads stored apart cost none past sinks + window)",
                            ["format"], multiprocess_mode="livesum")
        info = Gauge("lcx_config_info", "The active lcx config (value 1)", ["method", "kernel", "kv_format", "hash"],
                     multiprocess_mode="max")
        info.labels(m, config.kernel, config.kv_format, config_hash(config)).set(1)
        self._seen: dict[str, int] = {}
        self._layer_bytes: dict[int, tuple[str, float]] = {}

    def fallbacks(self, reasons: dict[str, int]) -> None:
        for reason, n in reasons.items():
            self._fallbacks.labels(self.method, reason).inc(n)

    def attention(self, plan: "BatchPlan", num_kv_heads: int, selection: "Selection | None" = None,
                  block_size: int = 1, attended: int | None = None) -> None:
        """One layer's attention over ``plan``: held and attended for each sequence's newest query."""
        held = sum(plan.lens) * num_kv_heads
        if attended is None:
            attended = int(attended_by_newest(plan, selection, block_size).sum()) if selection is not None else held
        self._held.inc(held)
        self._attended.inc(attended)

    def counters(self, counters: dict[str, int]) -> None:
        """Bring the selection-cache series up to the selectors' running counts."""
        delta = {k: v - self._seen.get(k, 0) for k, v in counters.items() if v != self._seen.get(k, 0)}
        if not delta:
            return
        self._seen.update({k: counters[k] for k in delta})
        self._lookups.inc(sum(delta.get(k, 0) for k in CACHE_LOOKUPS))
        self._hits.inc(sum(delta.get(k, 0) for k in CACHE_HITS))

    def layer_bytes(self, layer: int, fmt: str, per_token: float) -> None:
        """A layer's cache costs ``per_token`` bytes per context token in format ``fmt``."""
        self._layer_bytes[layer] = (fmt, per_token)
        total: dict[str, float] = {}
        for f, b in self._layer_bytes.values():
            total[f] = total.get(f, 0.0) + b
        for f, b in total.items():
            self._bytes.labels(f).set(b)


_metrics: Metrics | None = None
_checked = False
_logged_reasons: set[str] = set()


def dense_fallbacks(step: "StepPlan", selector, recorder: Metrics | None) -> dict[str, int]:
    """Once per engine step: the sequences a selecting method left dense, counted by reason
    (``selector.dense_reason``); each reason logged the first time it occurs in the process."""
    if selector.name == "dense" or not any(step.dense_rows):
        return {}
    reasons: dict[str, int] = {}
    plan = step.batch
    for b, dense in enumerate(step.dense_rows):
        if dense and plan.q_len(b) > 0:  # an idle row computes nothing: not a fallback
            reason = selector.dense_reason(plan.q_len(b), plan.lens[b])
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason in reasons.keys() - _logged_reasons:
        _logged_reasons.add(reason)
        get_logger().info("lcx: dense fallback: method %s serves sequences dense when %s (logged once; counted in "
                          "lcx_dense_fallbacks_total)", selector.name,
                          {"short_context": "the context is too short to select from",
                           "prefill": "they prefill"}.get(reason, reason))
    if recorder is not None:
        recorder.fallbacks(reasons)
    return reasons


def worker_metrics(config: "LcxConfig") -> Metrics | None:
    """This process's Metrics when ``$PROMETHEUS_MULTIPROC_DIR`` is set (else None, once logged)."""
    global _metrics, _checked
    if not _checked:
        _checked = True
        if os.environ.get(ENV):
            _metrics = Metrics(config)
        else:
            get_logger().info("lcx metrics off: set %s to an empty directory before starting the server to "
                              "get the lcx_* series on its /metrics", ENV)
    return _metrics
