"""The configuration lcx runs when none is given: a composition of its methods chosen by measurement.

``vllm serve MODEL --attention-backend lcx`` with no ``--additional-config`` and no ``$LCX_CONFIG``
serves :data:`RECOMMENDED` (README, "The default", has the figures behind it):

- **head split** (DuoAttention / RazorAttention): per layer, the 2 of 3 KV heads that the shipped
  calibration scores lowest keep only 64 sink tokens and a 512-token window, stored apart, so
  the engine holds more than twice the KV tokens (at the same element size);
- **TokenSelect, page granular**, on the remaining retrieval heads: at each decode step, the 256
  tokens' worth of pages whose key bounds score highest for the step's queries, plus 64 sinks and
  a 128-token window, scored afresh at every step (the selection cache hit on about 2% of the
  steps at ~7k tokens, less than its check costs). That is what makes a long-context decode step cheap;
- **dense below 2,048 tokens** on the retrieval heads (TokenSelect's ``min_context``): short
  contexts, where a selection saves little and the page variant's accuracy loss shows most, keep
  every token there;
- **int8 pages** under both kinds of heads (``kv_format``; per token and head, one scale and zero
  point per 64 channels): 136 bytes a token and head against bf16's 256, which takes the engine's
  KV capacity past 4x stock's. Decode attends on the codes (``kernels/paged/quant.py``), on a
  CPU in one native call per layer (``kernels/paged/cpu_op.c``), so the scales touch each score,
  not each element; ``"kv_format": "auto"`` keeps the model's dtype. SGLang's pools hold the model's
  dtype, so SGLang serves the same composition unquantized (``UNQUANTIZED_ENGINES``).

For a model without a shipped head pattern (``lcx calibrate`` makes one), the head split cannot
apply: the default is then TokenSelect alone, over every head, unquantized, and lcx says so at
startup. ``{"method": "dense"}`` is the stock arithmetic, one config key away.
"""
from __future__ import annotations

import copy
from typing import Any

#: Served when no config is given and the model has a shipped head pattern.
RECOMMENDED: dict[str, Any] = {
    "method": "head_split", "pattern": "auto", "streaming_fraction": 0.6667, "sink": 64, "window": 512,
    "retrieval": {"method": "token_select", "granularity": "page", "budget": 256, "sink": 64, "window": 128,
                  "min_context": 2048, "reuse_similarity": None},
    "kv_format": "int8",
}
#: Served when no config is given and no head pattern ships for the model.
WITHOUT_PATTERN: dict[str, Any] = RECOMMENDED["retrieval"]
#: Engines whose caches lcx cannot store quantized pages in: the default there keeps the model's dtype.
UNQUANTIZED_ENGINES = ("sglang",)

SOURCE = "lcx's recommended default (no config given)"


def recommended(model_name: str | None, engine: str = "vllm") -> dict[str, Any]:
    """The default config for the served model (its name or path) on ``engine``."""
    from lcx_plugin import head_patterns

    chosen = copy.deepcopy(RECOMMENDED if head_patterns.shipped(model_name) else WITHOUT_PATTERN)
    if engine in UNQUANTIZED_ENGINES:
        chosen.pop("kv_format", None)
    return chosen
