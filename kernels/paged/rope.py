"""Rotary position embeddings, re-applied: moving a rotated query or key to another position.

An engine rotates q and k at their absolute positions before attention and caches rotated keys.
Rotations compose, ``R(a) R(b) = R(a + b)``, so a key cached for position ``p`` becomes the key for
position ``c`` by one more rotation by ``c - p``: attention can place the tokens it reads at other
(compacted) positions without the pre-rotation values and without touching the cache format.

``Rope`` describes one model's rotation: the rotated dimensions, their inverse frequencies
(scaling already applied) and the pairing style, neox (first half with second half) or GPT-J
(even with odd). Angles are computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


#: Shifts up to this many positions either way read cos and sin from a table (cos and sin rows of
#: ``rotary_dim / 2`` per shift, 2^17 + 1 shifts at most: 32 MiB in float32 at rotary_dim 64);
#: farther ones are computed.
TABLE_REACH = 1 << 16


@dataclass(frozen=True)
class Rope:
    head_dim: int
    rotary_dim: int
    inv_freq: torch.Tensor  # [rotary_dim // 2] float64, CPU
    neox: bool = True

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if tuple(self.inv_freq.shape) != (self.rotary_dim // 2,):
            raise ValueError(f"inv_freq must have rotary_dim / 2 = {self.rotary_dim // 2} entries, "
                             f"got {tuple(self.inv_freq.shape)}")

    @classmethod
    def standard(cls, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None, neox: bool = True,
                 position_scale: float = 1.0) -> "Rope":
        """RoPE with base ``theta``; ``position_scale`` > 1 is linear position interpolation."""
        r = rotary_dim or head_dim
        inv = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        return cls(head_dim, r, inv / position_scale, neox)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., head_dim]`` rotated by ``delta`` positions (broadcast against ``x.shape[:-1]``).

        Integer ``delta`` reads cos and sin from a table of the same float64 angles, cast once per
        dtype and device (a long prefill re-positions every key of every layer: the angles would
        otherwise be recomputed for each)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"last dimension {x.shape[-1]} != head_dim {self.head_dim}")
        delta = torch.as_tensor(delta, device=x.device)
        integer = not (delta.is_floating_point() or delta.is_complex())
        reach = int(delta.abs().max()) if integer and delta.numel() else 0
        if not integer or reach > TABLE_REACH:
            angle = delta.to(torch.float64)[..., None] * self.inv_freq.to(x.device)
            cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        else:
            cos, sin = self._cos_sin(delta, reach, x.dtype)
        r, half = self.rotary_dim, self.rotary_dim // 2
        if not self.neox:
            a, b = x[..., 0:r:2], x[..., 1:r:2]
            rot = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
            return torch.cat([rot, x[..., r:].expand(*rot.shape[:-1], -1)], -1) if r < self.head_dim else rot
        a, b = x[..., :half], x[..., half:r]
        shape = torch.broadcast_shapes(a.shape, cos.shape)
        out = torch.empty(*shape[:-1], self.head_dim, dtype=torch.result_type(x, cos), device=x.device)
        ra, rb = out[..., :half], out[..., half:r]
        torch.mul(a, cos, out=ra).addcmul_(b, sin, value=-1)
        torch.mul(b, cos, out=rb).addcmul_(a, sin)
        if r < self.head_dim:
            out[..., r:] = x[..., r:]
        return out

    def _cos_sin(self, delta: torch.Tensor, reach: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``delta x inv_freq`` (``delta`` integer, at most ``reach`` either way),
        ``[*delta.shape, rotary_dim / 2]``."""
        key = (delta.device, dtype)
        tables = self.__dict__.setdefault("_tables", {})
        have = tables.get(key)
        if have is None or have[0] < reach:
            m = max(1024, 1 << (reach - 1).bit_length())  # a power of two >= reach: few rebuilds
            angle = torch.arange(-m, m + 1, dtype=torch.float64)[:, None] * self.inv_freq
            have = (m, angle.cos().to(device=delta.device, dtype=dtype), angle.sin().to(device=delta.device, dtype=dtype))
            tables[key] = have
        m, cos, sin = have
        at = (delta.long() + m).reshape(-1)
        shape = (*delta.shape, self.rotary_dim // 2)
        return cos.index_select(0, at).reshape(shape), sin.index_select(0, at).reshape(shape)
