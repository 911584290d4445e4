"""Rotary position embeddings: default, linear and YaRN frequency schedules, applied either to
halves (`rotate_half`, Llama/Mixtral/Qwen/OLMoE) or to interleaved pairs (DeepSeek).

Shapes: T tokens, H heads, R rotary dims (R <= head dim; the rotated dims come first... only
when R equals the head dim, which holds for every supported family).
"""

from __future__ import annotations

import math

import torch

from moeflow.models.spec import RopeSpec


def inv_frequencies(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """The per-pair inverse frequencies [R/2] (fp32) and the attention scaling applied to
    cos and sin."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pos_freqs = rope.theta ** exponents
    inv = 1.0 / pos_freqs
    if rope.scaling == "default":
        return inv, 1.0
    if rope.scaling == "linear":
        return inv / rope.factor, 1.0
    # YaRN: blend interpolated and extrapolated frequencies over a ramp of dimensions.
    factor = rope.factor
    if rope.attention_factor is not None:
        scaling = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        scaling = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        scaling = _yarn_mscale(factor, 1.0)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low: float = correction_dim(rope.beta_fast)
    high: float = correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - extrapolation) + inv * extrapolation, float(scaling)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RopeTable:
    """cos/sin for positions, computed once per position and grown on demand; with the
    tables `apply_half_rotation` takes, per dtype, made once too."""

    def __init__(self, rope: RopeSpec, initial_positions: int = 4096) -> None:
        self.rope = rope
        self.inv_freq, self.scaling = inv_frequencies(rope)
        self._cos = torch.empty(0, rope.rotary_dim // 2)
        self._sin = torch.empty(0, rope.rotary_dim // 2)
        self._half: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._grow(initial_positions)

    def _grow(self, n: int) -> None:
        freqs = torch.arange(n, dtype=torch.int64).float()[:, None] * self.inv_freq[None, :]
        self._cos = freqs.cos() * self.scaling
        self._sin = freqs.sin() * self.scaling
        self._half.clear()

    def _cover(self, positions: torch.Tensor, end: int | None) -> None:
        need = end if end is not None else (int(positions.max()) + 1 if positions.numel()
                                            else 0)
        if need > self._cos.shape[0]:
            self._grow(max(need, 2 * self._cos.shape[0]))

    def cos_sin(self, positions: torch.Tensor, end: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (all below `end`, if given) -> cos, sin [T, R/2] (fp32)"""
        self._cover(positions, end)
        return self._cos[positions], self._sin[positions]

    def half_tables(self, positions: torch.Tensor, dtype: torch.dtype, end: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> `half_rotation_tables` of their cos/sin: [T, 1, R] in `dtype`"""
        self._cover(positions, end)
        tables = self._half.get(dtype)
        if tables is None:
            tables = self._half[dtype] = half_rotation_tables(self._cos, self._sin, dtype)
        return tables[0][positions], tables[1][positions]


def half_rotation_tables(cos: torch.Tensor, sin: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, R/2] (fp32) -> cos [T, 1, R], signed sin [T, 1, R] in `dtype`, for
    `apply_half_rotation`. Compute once per batch, use in every layer."""
    c = torch.cat((cos, cos), dim=-1).to(dtype)
    s = torch.cat((-sin, sin), dim=-1).to(dtype)
    return c[:, None, :], s[:, None, :]


def apply_half_rotation(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
                        ) -> torch.Tensor:
    """x [T, H, R] -> x*cos + rotate_half(x)*sin, with tables from `half_rotation_tables`.

    rotate_half(x) * sin == roll(x, R/2) * cat(-sin, sin) exactly (negation is exact), which
    takes one op instead of four."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """x [T, H, R], cos/sin [T, R/2] -> [T, H, R], in x's dtype.

    Half rotation follows the families' own arithmetic: cos/sin are cast to x's dtype and
    combined there. Interleaved (DeepSeek) rotation is a complex product in fp32."""
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        xf = x.float().unflatten(-1, (-1, 2))
        re, im = xf[..., 0], xf[..., 1]
        out = torch.stack((re * c - im * s, re * s + im * c), dim=-1)
        return out.flatten(-2).to(x.dtype)
    c = torch.cat((c, c), dim=-1).to(x.dtype)
    s = torch.cat((s, s), dim=-1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s
