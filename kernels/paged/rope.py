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
        """``x`` ``[..., head_dim]`` rotated by ``delta`` positions (broadcast against ``x.shape[:-1]``)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"last dimension {x.shape[-1]} != head_dim {self.head_dim}")
        angle = torch.as_tensor(delta, dtype=torch.float64, device=x.device)[..., None] * self.inv_freq.to(x.device)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        r, half = self.rotary_dim, self.rotary_dim // 2
        if self.neox:
            a, b = x[..., :half], x[..., half:r]
        else:
            a, b = x[..., 0:r:2], x[..., 1:r:2]
        ra, rb = a * cos - b * sin, b * cos + a * sin
        if self.neox:
            rot = torch.cat([ra, rb], -1)
        else:
            rot = torch.stack([ra, rb], -1).flatten(-2)
        return torch.cat([rot, x[..., r:].expand(*rot.shape[:-1], -1)], -1) if r < self.head_dim else rot
