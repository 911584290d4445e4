"""Causal self-attention over a KV cache, for prefill chunks and batched decode.

With `sinks` (GPT-OSS: a learned logit per head), each softmax's denominator also holds
exp(sink): the probabilities over the keys sum to less than one. That takes the matmul path.

Shapes: n new tokens of one sequence, B sequences, H query heads, K key/value heads, d q/k
head dim, v value head dim, L keys (context length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.ops.cpuinfo import cpu_info


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                      scale: float, window: int | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, H, d], k [L, K, d], v [L, K, v] with L = start + n, sinks [H] or None
    -> [n, H, v]

    The new tokens sit at positions start..start+n-1 and see keys 0..their own position
    (and, with a sliding window w, only the last w of them)."""
    n, length = q.shape[0], k.shape[0]
    # CPU flash attention takes only 4-D inputs and no grouped kv heads; anything else falls
    # back to the math kernel, ~3x slower at 512 tokens.
    qh = q.transpose(0, 1)[None]
    kh, vh = _repeat_heads(k, q.shape[1])[None], _repeat_heads(v, q.shape[1])[None]
    if sinks is not None:
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [1, H, n, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = _softmax_with_sinks(scores, sinks[None, :, None, None])
        return torch.matmul(probs.to(vh.dtype), vh)[0].transpose(0, 1)  # [n, H, v]
    if start == 0 and (window is None or window >= length):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)  # [n, H, v]


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x [L, K, d] -> [H, L, d], each kv head repeated for its H/K query heads."""
    length, kv_heads, d = x.shape
    if kv_heads == heads:
        return x.transpose(0, 1)
    return (x.transpose(0, 1)[:, None].expand(kv_heads, heads // kv_heads, length, d)
            .reshape(heads, length, d))


# query-key products (B * L * H * d) up to which flash attention beats the matmul path
SMALL_DECODE_PRODUCTS = 1 << 16


def decode_mask(lengths: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """The key mask [B, 1, 1, L] for one new token per sequence at position lengths[b]-1,
    or None when every key up to L = max(lengths) is visible to every sequence."""
    values = lengths.tolist()
    longest = max(values)
    if min(values) == longest and (window is None or window >= longest):
        return None
    kpos = torch.arange(longest, device=lengths.device)[None, :]
    last = (lengths - 1)[:, None]
    mask = kpos <= last
    if window is not None:
        mask &= kpos > last - window
    return mask[:, None, None, :]


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """softmax over [keys..., sink] in fp32, the sink's column dropped: scores [..., L],
    sinks broadcastable to [..., 1]."""
    sink = sinks.float().expand(*scores.shape[:-1], 1)
    logits = torch.cat((scores.float(), sink), dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.softmax(logits, dim=-1)[..., :-1]


_WIDEN: list[bool] = []  # whether this CPU has no bf16 arithmetic, once known


def widen_on_this_cpu() -> bool:
    """Whether bf16 decode attention runs in fp32 here: on CPUs without bf16 dot products
    (no AVX-512 BF16, no AMX), whose bf16 matmuls torch runs several times slower than fp32
    ones. On a 2-core AVX2 EPYC, 16 sequences of 512 keys at 32 query / 8 KV heads of 128
    took 120 ms in bf16 and 40 ms widened (23 ms of it the conversion). Decided by the CPU's
    flags, not a timing, so that every process of a run computes alike."""
    if not _WIDEN:
        flags = cpu_info()[1]
        x86 = "avx2" in flags or "avx" in flags
        _WIDEN.append(x86 and "avx512_bf16" not in flags and "amx_bf16" not in flags)
    return _WIDEN[0]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scale: float,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, d], k [B, L, K, d], v [B, L, K, v], mask from `decode_mask`, sinks [H] or
    None -> [B, H, v]

    One new token per sequence; keys the mask hides are padding (or outside the window).
    CPU flash attention costs ~10 us plus ~0.7 ns per query-key product (B*L*H*d); two
    batched matmuls around an fp32 softmax (on oneDNN: see ops/backend.py) cost ~50 us and
    little per product, so they take over from about 65k products: 256 keys in the batch at
    8 query / 2 kv heads of 32, ~96 at 16 / 4 of 64 (measured on an AVX-512 BF16 machine,
    bf16). On CPUs without bf16 arithmetic (`widen_on_this_cpu`), bf16 inputs are widened
    to fp32 and go through the fused kernel."""
    if q.dtype == torch.bfloat16 and q.is_cpu and widen_on_this_cpu():
        if sinks is None:
            return _sdpa(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
        return _attend(q.float(), k.float(), v.float(), mask, scale, sinks).to(q.dtype)
    batch, heads, d = q.shape
    if sinks is None and batch * k.shape[1] * heads * d <= SMALL_DECODE_PRODUCTS:
        return _sdpa(q, k, v, mask, scale)
    return _attend(q, k, v, mask, scale, sinks)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """decode_attention through torch's fused kernel (no sinks)"""
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=scale, enable_gqa=k.shape[2] != q.shape[1])  # [B, H, 1, v]
    return out[:, :, 0, :]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """decode_attention as two batched matmuls around an fp32 softmax"""
    batch, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = q.view(batch, kv_heads, heads // kv_heads, d)  # [B, K, G, d]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, K, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        group = heads // kv_heads
        probs = _softmax_with_sinks(scores, sinks.view(kv_heads, group)[None, :, :, None])
        probs = probs.to(q.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, K, G, v]
    return out.reshape(batch, heads, -1)
