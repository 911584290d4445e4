"""Causal self-attention over a KV cache, for prefill chunks and batched decode.

Shapes: n new tokens of one sequence, B sequences, H query heads, K key/value heads, d q/k
head dim, v value head dim, L keys (context length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                      scale: float, window: int | None = None) -> torch.Tensor:
    """q [n, H, d], k [L, K, d], v [L, K, v] with L = start + n -> [n, H, v]

    The new tokens sit at positions start..start+n-1 and see keys 0..their own position
    (and, with a sliding window w, only the last w of them)."""
    n, length = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    gqa = kh.shape[0] != qh.shape[0]
    if start == 0 and (window is None or window >= length):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    else:
        qpos = torch.arange(start, start + n)[:, None]
        kpos = torch.arange(length)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
    return out.transpose(0, 1)  # [n, H, v]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lengths: torch.Tensor, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """q [B, H, d], k [B, L, K, d], v [B, L, K, v], lengths [B] -> [B, H, v]

    One new token per sequence, at position lengths[b]-1; keys past lengths[b] are padding."""
    kpos = torch.arange(k.shape[1])[None, :]
    last = (lengths - 1)[:, None]
    mask = kpos <= last
    if window is not None:
        mask &= kpos > last - window
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
        scale=scale, enable_gqa=k.shape[2] != q.shape[1])  # [B, H, 1, v]
    return out[:, :, 0, :]
