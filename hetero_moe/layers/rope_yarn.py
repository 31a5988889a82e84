"""Rotary embedding with YaRN context extension, as ggml's rope op computes it.

ggml rotates pair i (frequency theta_i = pos * base^(-2i/n_rot)) by a blend of the interpolated
angle (theta_i * freq_scale) and the original one: dims below the "correction" range keep the original
angle, dims above it are fully interpolated, with a linear ramp in between. The ramp ends come from
beta_fast / beta_slow (how many rotations fit in the original context). When the blend is on
(ext_factor != 0) ggml also multiplies cos/sin by attn_factor * (1 + 0.1 ln(1/freq_scale)).

Dimension key: T tokens, heads any, R rotated dims (n_rot).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.base import ROPE_NEOX, ROPE_NORM


@dataclass(frozen=True)
class YarnParams:
    """What ggml_rope_ext takes besides the tensor: llama.cpp's cparams after context creation."""
    n_rot: int
    base: float
    kind: str = ROPE_NORM          # pairing: ROPE_NORM (2i, 2i+1) or ROPE_NEOX (i, i + R/2)
    freq_scale: float = 1.0        # 1 / rope.scaling.factor
    ext_factor: float = 0.0        # 1 for YaRN, 0 for plain or linear scaling
    attn_factor: float = 1.0       # llama.cpp's cparams.yarn_attn_factor
    n_ctx_orig: int = 4096         # rope.scaling.original_context_length
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def corr_dims(self) -> tuple[float, float]:
        """The first and last pair index of the ramp (ggml_rope_yarn_corr_dims)."""
        def corr_dim(n_rotations: float) -> float:
            return (self.n_rot * math.log(self.n_ctx_orig / (n_rotations * 2 * math.pi))
                    / (2 * math.log(self.base)))
        lo = math.floor(corr_dim(self.beta_fast))
        hi = math.ceil(corr_dim(self.beta_slow))
        return max(0.0, lo), min(self.n_rot - 1.0, hi)

    def magnitude(self) -> float:
        """The factor on cos/sin: attn_factor, times YaRN's own scale when the blend is on."""
        m = self.attn_factor
        if self.ext_factor != 0:
            m *= 1.0 + 0.1 * math.log(1.0 / self.freq_scale)
        return m


def yarn_angles(p: YarnParams, n_ctx: int) -> torch.Tensor:
    """Rotation angles [n_ctx, R/2] float64."""
    i = torch.arange(0, p.n_rot, 2, dtype=torch.float64)          # i0 = 2 * pair index
    theta_extrap = p.base ** (-i / p.n_rot)                         # [R/2]
    theta_interp = p.freq_scale * theta_extrap
    theta = theta_interp
    if p.ext_factor != 0:
        lo, hi = p.corr_dims()
        y = (i / 2 - lo) / max(0.001, hi - lo)
        ramp = (1 - y.clamp(0, 1)) * p.ext_factor                  # 1: keep the original angle
        theta = theta_interp * (1 - ramp) + theta_extrap * ramp
    pos = torch.arange(n_ctx, dtype=torch.float64)
    return torch.outer(pos, theta)


class YarnRope:
    """Same call as attention.Rope: x [T, heads, R] (or wider; the first R dims rotate), pos0."""

    def __init__(self, p: YarnParams, n_ctx: int, device: str):
        if p.kind not in (ROPE_NORM, ROPE_NEOX):
            raise ValueError(f"unknown rope type {p.kind!r}")
        ang = yarn_angles(p, n_ctx)
        m = p.magnitude()
        self.cos = (ang.cos() * m).float().to(device)              # [n_ctx, R/2]
        self.sin = (ang.sin() * m).float().to(device)
        self.n_rot, self.kind, self.params = p.n_rot, p.kind, p

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        T = x.shape[0]
        cos = self.cos[pos0:pos0 + T, None, :]                      # [T, 1, R/2]
        sin = self.sin[pos0:pos0 + T, None, :]
        rot, rest = x[..., :self.n_rot], x[..., self.n_rot:]
        if self.kind == ROPE_NORM:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:
            h = self.n_rot // 2
            a, b = rot[..., :h], rot[..., h:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
