"""Checkers that compare two engine runs of the same prompts: exactly, or teacher-forced.

A greedy continuation may flip at a near-tie when the arithmetic changes by rounding (a batch of
another size, a chunked prefill), and everything after a flip is a different text, so counting
diverged outputs says little. These checkers compare what both runs computed on the same tokens:

* ``prompt_gap``: the prompt's log-probabilities, position by position (teacher-forced by the
  prompt itself);
* ``decode_agreement``: the generated steps up to the first flip, log-probability by
  log-probability, and the flip itself, which must be a near-tie in both runs (each run's choice
  is in the other's top two, within ``tie`` nats of the other's best). A run that read another
  request's KV, or lost part of its own, is confidently different and fails.

Each returns a small dict of figures; ``problems`` lists what broke the stated tolerance.
"""
from __future__ import annotations


def prompt_gap(a: list, b: list) -> dict:
    """Largest and mean absolute difference of two per-position log-probability lists (``None``
    entries, the first token's, skipped). Lists of different lengths are a mismatch, not a gap."""
    if len(a) != len(b):
        return {"mean": float("inf"), "max": float("inf"), "n": 0, "length": (len(a), len(b))}
    d = [abs(x - y) for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"mean": 0.0, "max": 0.0, "n": 0}
    return {"mean": sum(d) / len(d), "max": max(d), "n": len(d)}


def decode_agreement(tokens_a: list[int], top_a: list[dict], tokens_b: list[int], top_b: list[dict]) -> dict:
    """Per-step comparison of two greedy continuations of one prompt, with each step's top-2
    log-probabilities (``{token: logprob}``, as returned with ``logprobs=2``).

    Returns ``{"steps": steps compared, "max_gap": largest |logprob| difference of the chosen token
    over those steps, "flip": None or {"step", "margin_a", "margin_b"}}``: at a flip, ``margin_a``
    is how far run a's best is above run b's choice in a's own top two (``inf`` when b's choice is
    not among them), and ``margin_b`` the same for b."""
    if len(tokens_a) != len(tokens_b):
        return {"steps": 0, "max_gap": float("inf"), "flip": None, "length": (len(tokens_a), len(tokens_b))}
    top_a, top_b = _keyed(top_a), _keyed(top_b)
    gap, steps = 0.0, 0
    for i, (ta, tb) in enumerate(zip(tokens_a, tokens_b)):
        if ta != tb:
            ma = top_a[i][ta] - top_a[i].get(tb, float("-inf"))
            mb = top_b[i][tb] - top_b[i].get(ta, float("-inf"))
            return {"steps": steps, "max_gap": gap, "flip": {"step": i, "margin_a": ma, "margin_b": mb}}
        gap = max(gap, abs(top_a[i][ta] - top_b[i][tb]))
        steps += 1
    return {"steps": steps, "max_gap": gap, "flip": None}


def _keyed(steps: list[dict]) -> list[dict[int, float]]:
    """Token ids as ints (a JSON round trip makes them strings)."""
    return [{int(t): lp for t, lp in s.items()} for s in steps]


def problems(prompt: dict | None, decode: dict | None, tol: float, tie: float) -> list[str]:
    """What breaks the tolerance: a prompt log-probability or a decode step off by more than
    ``tol`` nats, a length mismatch, or a flip that is not a near-tie (margin above ``tie + tol``
    in either run)."""
    out = []
    if prompt is not None and (prompt.get("length") or prompt["max"] > tol):
        out.append(f"prompt log-probabilities differ by up to {prompt['max']:.4g} nats (tolerance {tol:.4g})")
    if decode is not None:
        if decode.get("length"):
            out.append(f"continuations of different lengths {decode['length']}")
        elif decode["max_gap"] > tol:
            out.append(f"a generated token's log-probability differs by {decode['max_gap']:.4g} nats (tolerance {tol:.4g})")
        flip = decode["flip"]
        if flip and max(flip["margin_a"], flip["margin_b"]) > tie + tol:
            out.append(f"the continuations flip at step {flip['step']} with margins {flip['margin_a']:.4g} / "
                       f"{flip['margin_b']:.4g} nats: not a near-tie (at most {tie + tol:.4g})")
    return out
