"""Head patterns: which KV heads of a model are retrieval heads (full KV) and which are streaming
heads (sinks + a recent window), from per-head scores.

Two file formats are read, never with pickle, and each is checked in full before use:

- the project's own JSON (``lcx calibrate`` writes it), which records the model it was made for::

      {"format": "lcx-head-pattern", "version": 1,
       "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64},
       "scores": [[...per KV head...], ...per layer...],      # higher = more retrieval-like
       "source": {...how it was made...}}

- DuoAttention's released ``full_attention_heads.tsv``: one row per layer, one tab- (or space-)
  separated float per KV head, higher = more full-attention. It carries no model identity, so only
  its shape is checked against the served model.

A pattern turns into a mask by a ``streaming_fraction`` (the lowest-scoring fraction of all KV heads
streams; ties broken by position, so the mask is deterministic) or by a ``threshold`` (heads
scoring below it stream). Heads are indexed globally; under tensor parallelism each rank takes the
slice of its own KV heads.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcx_plugin.errors import LcxConfigError, user_path

FORMAT = "lcx-head-pattern"
VERSION = 1
MAX_BYTES = 8 << 20  # far beyond any real model's layers x KV heads
SHIPPED = Path(__file__).resolve().parent / "patterns"


@dataclass(frozen=True)
class ModelShape:
    """What a pattern must agree with: the served model's attention shape (global, before any
    tensor-parallel split) and, where known, its name."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    name: str | None = None


@dataclass(frozen=True)
class HeadPattern:
    scores: torch.Tensor  # [layers, kv_heads] float64, finite
    model: ModelShape | None  # None for DuoAttention's TSV (shape only)
    source: dict = field(default_factory=dict, compare=False)
    path: str = ""

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.scores.shape[1]

    def streaming_mask(self, streaming_fraction: float | None = None, threshold: float | None = None,
                       per_layer: bool = False) -> torch.Tensor:
        """``[layers, kv_heads]`` bool, True = streaming head. Exactly one of the two rules. With
        ``per_layer``, the fraction applies within each layer (every layer streams the same number
        of heads, its lowest-scoring ones); otherwise across the whole model."""
        if (streaming_fraction is None) == (threshold is None):
            raise LcxConfigError("a head pattern needs exactly one of streaming_fraction and threshold")
        if threshold is not None:
            return (self.scores < threshold)
        if per_layer:
            return torch.stack([HeadPattern(row[None], None).streaming_mask(streaming_fraction)[0]
                                for row in self.scores])
        flat = self.scores.flatten()
        n = round(streaming_fraction * flat.numel())
        # Stable: equal scores keep their (layer, head) order, so the mask is the same on every run.
        order = torch.sort(flat, stable=True).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order[:n]] = True
        return mask.view_as(self.scores)

    def check(self, shape: ModelShape) -> list[str]:
        """Why this pattern does not fit the served model (empty: it fits). Names differing is not an
        error (a served path need not carry the name), the shape differing is."""
        problems = []
        if (self.num_layers, self.num_kv_heads) != (shape.num_layers, shape.num_kv_heads):
            problems.append(f"it has {self.num_layers} layers x {self.num_kv_heads} KV heads, the served model "
                            f"{shape.num_layers} x {shape.num_kv_heads}")
        if self.model is not None and self.model.head_dim != shape.head_dim:
            problems.append(f"it was made for head_dim {self.model.head_dim}, the served model has {shape.head_dim}")
        return problems

    def to_json(self) -> dict[str, Any]:
        if self.model is None:
            raise ValueError("a pattern without a model identity cannot be written in lcx's format")
        m = self.model
        return {"format": FORMAT, "version": VERSION,
                "model": {"name": m.name, "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads,
                          "head_dim": m.head_dim},
                "scores": [[round(float(x), 6) for x in row] for row in self.scores], "source": self.source}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def _fail(path, why: str) -> LcxConfigError:
    return LcxConfigError(f"head pattern {path}: {why}")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise _fail(path, "no such file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise _fail(path, f"{size} bytes; a head pattern is at most {MAX_BYTES} bytes")
    if size == 0:
        raise _fail(path, "the file is empty")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"not UTF-8 text ({e})") from None


def _matrix(rows: Any, path) -> torch.Tensor:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise _fail(path, "scores must be a non-empty list of non-empty lists (layers x KV heads)")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise _fail(path, f"rows have different lengths {sorted(widths)}: every layer needs one score per KV head")
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise _fail(path, f"score at layer {i}, KV head {j} is {x!r}; scores are finite numbers")
    return torch.tensor(rows, dtype=torch.float64)


def _int_field(d: dict, key: str, path) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(path, f"model.{key}={v!r} must be a positive integer")
    return v


def _from_json(text: str, path) -> HeadPattern:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e}); truncated?") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail(path, f'not an lcx head pattern (needs "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise _fail(path, f"version {data.get('version')!r} is not supported (this lcx reads version {VERSION})")
    m = data.get("model")
    if not isinstance(m, dict):
        raise _fail(path, '"model" must be an object with num_layers, num_kv_heads, head_dim and name')
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(path, f"model.name={name!r} must be a string")
    model = ModelShape(_int_field(m, "num_layers", path), _int_field(m, "num_kv_heads", path),
                       _int_field(m, "head_dim", path), name)
    scores = _matrix(data.get("scores"), path)
    if tuple(scores.shape) != (model.num_layers, model.num_kv_heads):
        raise _fail(path, f"scores are {tuple(scores.shape)} but the model record says "
                          f"{model.num_layers} layers x {model.num_kv_heads} KV heads")
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    return HeadPattern(scores, model, source, str(path))


def _from_tsv(text: str, path) -> HeadPattern:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append([float(x) for x in line.split()])
        except ValueError:
            raise _fail(path, f"line {n} is not a row of numbers: {line[:60]!r}") from None
    return HeadPattern(_matrix(rows, path), None, {"format": "duo-attention tsv"}, str(path))


def load(path: str | Path) -> HeadPattern:
    """Read a pattern file (lcx JSON, or DuoAttention TSV by its ``.tsv`` suffix or its content)."""
    path = user_path(path, "head pattern file")
    text = _read_text(path)
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        return _from_json(text, path)
    return _from_tsv(text, path)


def shipped(model_name: str | None) -> Path | None:
    """The pattern shipped with lcx for a model of this name (case-insensitive), if any."""
    if not model_name:
        return None
    want = Path(model_name.rstrip("/")).name.lower()
    for p in sorted(SHIPPED.glob("*.json")):
        try:
            if (json.loads(p.read_text(encoding="utf-8")).get("model", {}).get("name") or "").lower() == want:
                return p
        except (OSError, json.JSONDecodeError):
            continue
    return None


def random_pattern(shape: ModelShape, seed: int) -> HeadPattern:
    """Scores drawn at random: the baseline that shows what calibration is worth."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape.num_layers, shape.num_kv_heads, generator=g, dtype=torch.float64)
    return HeadPattern(scores, shape, {"method": "random", "seed": seed})
