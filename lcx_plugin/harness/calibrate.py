"""``lcx calibrate``: score every KV head of a model as retrieval or streaming, on one CPU, and write
a head pattern (``lcx_plugin/head_patterns.py``).

Three modes, all on synthetic needle prompts (lcx ab's generator, seeds of their own), with the
answer appended and teacher-forced:

- ``ablate`` (default, training-free, measured): for every layer and KV head, stream that head
  alone (the rest of the model full) and, separately, keep that head alone full while the layer's
  other heads stream; each time, measure how much the answer's negative log-likelihood grows.
  A head's score is the first growth minus the second, in nats: streaming a retrieval head costs
  the answer much, and keeping it alone full costs little. Layers below the ablated one are never
  recomputed (their outputs are cached from the full run).
- ``mass`` (training-free, a few minutes on the embedded model): run the model in float32 and, at
  the rows that answer (the question's last tokens and the answer itself, teacher-forced), measure
  how much attention each head puts outside its sinks and recent window. A head that must look far
  back to answer is a retrieval head. A KV head scores the largest mass of its query heads.
- ``gates`` (DuoAttention's optimisation): one gate ``a`` in [0, 1] per (layer, KV head) mixes full
  attention with sink + window attention, ``a * full + (1 - a) * streaming``. The gates are trained
  to keep the last hidden states at the answering rows equal to full attention's, with an L1
  penalty that pushes them towards streaming; the model's weights stay frozen. The trained gates
  are the scores.

The model runs in Hugging Face transformers with an attention function of lcx's own, so the
calibration shares nothing with the kernels it configures.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lcx_plugin.head_patterns import HeadPattern, ModelShape

SEED_BASE = 90_001  # calibration prompts never coincide with the tests' or the benchmarks'


@dataclass
class _State:
    mode: str = "off"  # "mass" | "gates" | "ablate" | "off"
    sink: int = 64
    window: int = 256
    rows: torch.Tensor | None = None  # query rows that are scored
    mass: torch.Tensor | None = None  # [layers, q_heads] summed mass outside sink + window
    gates: torch.Tensor | None = None  # [layers, kv_heads] logits (trained)
    stream: dict | None = None  # ablate: layer -> bool [kv_heads], the heads that stream


STATE = _State()


def _visible(rows: torch.Tensor, t: int, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For query rows ``rows`` over ``t`` keys: (causal mask, sink + window mask) ``[R, T]`` bool."""
    j = torch.arange(t)[None, :]
    i = rows[:, None]
    causal = j <= i
    return causal, causal & ((j < sink) | (j > i - window))


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    hq, hkv, t = query.shape[1], key.shape[1], query.shape[2]
    group = hq // hkv
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    full = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)
    layer = module.layer_idx
    if STATE.mode == "mass":
        rows = STATE.rows
        causal, kept = _visible(rows, t, STATE.sink, STATE.window)
        s = (query[:, :, rows] @ k.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)  # [B, H, R, T]
        STATE.mass[layer] += p.masked_fill(kept, 0.0).sum(-1).mean(-1).sum(0)
    elif STATE.mode == "gates":
        _, band = _visible(torch.arange(t), t, STATE.sink, STATE.window)
        stream = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=band, scale=scale)
        a = torch.sigmoid(STATE.gates[layer]).repeat_interleave(group)[None, :, None, None]
        full = a * full + (1 - a) * stream
    elif STATE.mode == "ablate" and layer in STATE.stream:
        heads = STATE.stream[layer].repeat_interleave(group).nonzero().flatten()
        _, band = _visible(torch.arange(t), t, STATE.sink, STATE.window)
        full = full.clone()
        full[:, heads] = torch.nn.functional.scaled_dot_product_attention(
            query[:, heads], k[:, heads], v[:, heads], attn_mask=band, scale=scale)
    return full.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make lcx's calibration attention known to transformers; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register("lcx_calibrate", _attention)
    return "lcx_calibrate"


def _load_model(path: str):
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="lcx_calibrate")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def shape_of(model, name: str) -> ModelShape:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelShape(c.num_hidden_layers, c.num_key_value_heads, head_dim, name)


def prompts(tokenizer, n: int, length: int) -> list[tuple[list[int], int]]:
    """``n`` passkey / multi-key prompts of about ``length`` tokens, each with its answer appended:
    (token ids, index of the first answer token)."""
    from lcx_plugin.harness.ab.tasks import generate

    out = []
    for i in range(n):
        task = ("passkey", "multikey")[i % 2]
        depth = (i + 0.5) / n * 0.8 + 0.05  # spread over the context, never inside the recent window
        s = generate(task, length, round(depth, 3), SEED_BASE + i, tokenizer)
        ids = tokenizer.encode(s.prompt)
        answer = tokenizer.encode(" " + s.answers[0], add_special_tokens=False)
        out.append((ids + answer, len(ids)))
    return out


def _rows(n_tokens: int, answer_start: int, question: int = 16) -> torch.Tensor:
    """The rows that answer: the prompt's last ``question`` tokens and every answer token but the
    last (each row predicts the next token)."""
    return torch.arange(max(0, answer_start - question), n_tokens - 1)


@torch.no_grad()
def score_mass(model, data, sink: int, window: int, progress) -> torch.Tensor:
    c = model.config
    STATE.mode, STATE.sink, STATE.window = "mass", sink, window
    STATE.mass = torch.zeros(c.num_hidden_layers, c.num_attention_heads, dtype=torch.float64)
    try:
        for ids, start in data:
            STATE.rows = _rows(len(ids), start)
            model(torch.tensor([ids]))
            progress.advance()
    finally:
        STATE.mode = "off"
    per_q = STATE.mass / len(data)
    group = c.num_attention_heads // c.num_key_value_heads
    return per_q.view(c.num_hidden_layers, c.num_key_value_heads, group).amax(-1)


def _decoder(model):
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("layers", "rotary_emb", "norm")) or not hasattr(model, "lm_head"):
        raise ValueError(f"--mode ablate needs a Llama-style decoder (model.layers, rotary_emb, norm, lm_head); "
                         f"{type(model).__name__} is not one: use --mode mass or gates")
    return inner


def _answer_nll(model, inner, h: torch.Tensor, first: int, ids: list[int], start: int) -> torch.Tensor:
    """Run layers ``first``.. on ``h`` (the input of layer ``first``); the answer's NLL per token."""
    pos = torch.arange(h.shape[1])[None]
    pe = inner.rotary_emb(h, position_ids=pos)
    for layer in inner.layers[first:]:
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
    logits = model.lm_head(inner.norm(h[0, start - 1:len(ids) - 1])).float()
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[start:])[:, None])[:, 0]


@torch.no_grad()
def score_ablate(model, data, sink: int, window: int, progress) -> torch.Tensor:
    c = model.config
    inner = _decoder(model)
    n_layers, n_kv = c.num_hidden_layers, c.num_key_value_heads
    STATE.mode, STATE.sink, STATE.window, STATE.stream = "off", sink, window, {}
    cached = []  # per prompt: the input of every layer, and the full model's answer NLL
    for ids, start in data:
        hs = model(torch.tensor([ids]), output_hidden_states=True, logits_to_keep=1).hidden_states
        cached.append((ids, start, hs[:n_layers], _answer_nll(model, inner, hs[0], 0, ids, start)))
        progress.advance()
    growth = torch.zeros(2, n_layers, n_kv, dtype=torch.float64)  # [stream it alone | keep it alone]
    STATE.mode = "ablate"
    try:
        for layer in range(n_layers):
            for head in range(n_kv):
                for which in (0, 1):
                    streams = torch.full((n_kv,), bool(which))
                    streams[head] = not which
                    if streams.any():
                        STATE.stream = {layer: streams}
                        growth[which, layer, head] = sum(
                            float((_answer_nll(model, inner, hs[layer], layer, ids, start) - base).sum())
                            for ids, start, hs, base in cached) / len(cached)
                    progress.advance()
    finally:
        STATE.mode, STATE.stream = "off", None
    return growth[0] - growth[1]


def train_gates(model, data, sink: int, window: int, steps: int, l1: float, lr: float, progress) -> torch.Tensor:
    c = model.config
    targets = []
    STATE.mode = "off"
    with torch.no_grad():
        for ids, start in data:
            rows = _rows(len(ids), start)
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, rows]
            targets.append((ids, rows, h))
    STATE.gates = torch.full((c.num_hidden_layers, c.num_key_value_heads), 3.0, requires_grad=True)
    STATE.mode, STATE.sink, STATE.window = "gates", sink, window
    opt = torch.optim.Adam([STATE.gates], lr=lr)
    try:
        for step in range(steps):
            ids, rows, target = targets[step % len(targets)]
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, rows]
            distill = ((h - target) ** 2).sum(-1).mean() / target.pow(2).sum(-1).mean()
            penalty = torch.sigmoid(STATE.gates).mean()
            loss = distill + l1 * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress.advance(note=f"distill {float(distill):.4f} mean gate {float(penalty):.3f}")
    finally:
        STATE.mode = "off"
    return torch.sigmoid(STATE.gates.detach()).double()


# Per mode: (prompts, tokens per prompt). ablate runs 2 x layers x KV heads partial forwards per
# prompt (about 25 minutes on the embedded model on 2 cores with its defaults).
DEFAULTS = {"ablate": (6, 1280), "mass": (12, 2048), "gates": (12, 2048)}


def calibrate(model_path: str, mode: str = "ablate", n_prompts: int | None = None, length: int | None = None,
              sink: int = 64, window: int = 256, steps: int = 60, l1: float = 0.05, lr: float = 0.1,
              name: str | None = None) -> HeadPattern:
    from lcx_plugin.harness.progress import Progress

    if mode not in DEFAULTS:
        raise ValueError(f"mode={mode!r} is not one of {sorted(DEFAULTS)}")
    n_prompts = n_prompts or DEFAULTS[mode][0]
    length = length or DEFAULTS[mode][1]
    if sink + window >= length:
        raise ValueError(f"sink + window ({sink} + {window}) must be shorter than the prompts ({length} tokens): "
                         "a window that covers the prompt removes nothing, and every head would score the same")
    from transformers import AutoTokenizer

    # The prompts first (a tokenizer only): a length their tasks cannot fit stops here, before the model loads.
    data = prompts(AutoTokenizer.from_pretrained(model_path), n_prompts, length)
    torch.manual_seed(0)
    model = _load_model(model_path)
    shape = shape_of(model, name or Path(model_path.rstrip("/")).name)
    t0 = time.perf_counter()
    if mode == "ablate":
        c = model.config
        with Progress(len(data) + 2 * c.num_hidden_layers * c.num_key_value_heads, "lcx calibrate (ablate)") as p:
            scores = score_ablate(model, data, sink, window, p)
    elif mode == "mass":
        with Progress(len(data), "lcx calibrate (mass)") as p:
            scores = score_mass(model, data, sink, window, p)
    elif mode == "gates":
        with Progress(steps, "lcx calibrate (gates)") as p:
            scores = train_gates(model, data, sink, window, steps, l1, lr, p)
    source = {"method": mode, "prompts": n_prompts, "length": length, "sink": sink, "window": window,
              "seconds": round(time.perf_counter() - t0, 1)}
    if mode == "gates":
        source.update(steps=steps, l1=l1, lr=lr)
    return HeadPattern(scores, shape, source)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="score KV heads as retrieval or streaming; write a head pattern",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--mode", choices=tuple(DEFAULTS), default="ablate")
    p.add_argument("--out", required=True, help="where to write the pattern (JSON)")
    p.add_argument("--prompts", type=int, default=None,
                   help="synthetic needle prompts (default: " + ", ".join(f"{m} {n}" for m, (n, _) in DEFAULTS.items()) + ")")
    p.add_argument("--length", type=int, default=None,
                   help="tokens per prompt (default: " + ", ".join(f"{m} {t}" for m, (_, t) in DEFAULTS.items()) + ")")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--steps", type=int, default=60, help="gates mode: optimiser steps")
    p.add_argument("--l1", type=float, default=0.05, help="gates mode: weight of the penalty on open gates")
    p.add_argument("--name", default=None, help="model name recorded in the pattern (default: directory name)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lcx_plugin.harness.model import prepare

    for key in ("prompts", "length", "sink", "window", "steps"):
        if getattr(args, key) is not None and getattr(args, key) < (0 if key == "sink" else 1):
            print(f"lcx calibrate: error: --{key} must be positive", file=sys.stderr)
            return 2
    if not math.isfinite(args.l1) or args.l1 < 0:
        print("lcx calibrate: error: --l1 must be >= 0", file=sys.stderr)
        return 2
    path = args.model or str(prepare())
    try:
        pattern = calibrate(path, args.mode, args.prompts, args.length, args.sink, args.window, args.steps, args.l1,
                            name=args.name)
    except ValueError as e:  # a length the prompts cannot fit, a window covering them, a model ablate cannot run
        print(f"lcx calibrate: error: {e}", file=sys.stderr)
        return 2
    out = pattern.save(args.out)
    order = pattern.scores.flatten().sort().values
    print(f"wrote {out}: {pattern.num_layers} layers x {pattern.num_kv_heads} KV heads, mode {args.mode}, "
          f"scores from {float(order[0]):.3g} to {float(order[-1]):.3g}, {pattern.source['seconds']} s")
    return 0
