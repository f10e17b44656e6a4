"""An independent oracle for engine tests: the embedded model in Hugging Face transformers, float32,
with its attention restricted exactly as an lcx selection defines it (sinks + recent window per
query, or dense).

It shares no code with lcx's kernels or the engine: the model code is transformers', the masked
attention a few lines of plain torch here. Engine outputs are compared with it teacher-forced:
the log-probability of each token given the tokens before it.
"""
from __future__ import annotations

import functools

import torch

_MASK = {"sink": 0, "window": None, "streaming": None}  # window None: dense; streaming: [layers, Hkv] bool


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None), causal + sink/window."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    t = query.shape[2]
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    visible = j <= i
    if _MASK["window"] is not None:
        windowed = visible & ((j < _MASK["sink"]) | (j > i - _MASK["window"]))
        if _MASK["streaming"] is None:
            visible = windowed
        else:  # a head split: streaming KV heads windowed, retrieval heads dense
            heads = _MASK["streaming"][module.layer_idx].repeat_interleave(group)[:, None, None]
            visible = torch.where(heads, windowed, visible)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ value
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _model(path: str):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("lcx_reference", _attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="lcx_reference")
    return model.eval()


@torch.no_grad()
def token_logprobs(path: str, token_ids: list[int], sink: int = 0, window: int | None = None,
                   streaming: torch.Tensor | None = None) -> list[float]:
    """``out[i]`` = log p(token_ids[i+1] | token_ids[:i+1]) under the restricted attention (on the
    heads marked in ``streaming`` ``[layers, kv_heads]`` only, when given)."""
    _MASK.update(sink=sink, window=window, streaming=streaming)
    logits = _model(path)(torch.tensor([token_ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0].tolist()
