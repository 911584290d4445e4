"""MXFP4: the 4-bit expert weights of GPT-OSS checkpoints.

The format (OCP Microscaling Formats v1.0, "MXFP4"):

- Elements are FP4 E2M1: a sign bit and eight magnitudes, 0, 0.5, 1, 1.5, 2, 3, 4, 6.
  Code c in 0..15 is ``FP4_VALUES[c]``; bit 3 is the sign, so code 8 is -0.0.
- Each block of 32 consecutive elements shares one E8M0 scale byte s, worth 2^(s - 127).
  An element's value is ``FP4_VALUES[c] * 2^(s - 127)``.
- Two codes share a byte: element 2j is the LOW nibble, element 2j+1 the HIGH nibble.

How the hub stores a GPT-OSS MoE layer (``quantization_config.quant_method == "mxfp4"``):

    model.layers.{i}.mlp.experts.gate_up_proj_blocks  uint8 [E, 2F, D/32, 16]
    model.layers.{i}.mlp.experts.gate_up_proj_scales  uint8 [E, 2F, D/32]
    model.layers.{i}.mlp.experts.down_proj_blocks     uint8 [E, D, F/32, 16]
    model.layers.{i}.mlp.experts.down_proj_scales     uint8 [E, D, F/32]
    model.layers.{i}.mlp.experts.gate_up_proj_bias    bf16  [E, 2F]
    model.layers.{i}.mlp.experts.down_proj_bias       bf16  [E, D]

Rows are output features and blocks run along the input features, as in ``nn.Linear``: for
gate_up the blocked dim is D, for down it is F. So ``dequantize`` of one expert's gate_up gives
[2F, D] and of its down gives [D, F]. The gate_up rows interleave gate and up: row 2j is gate
feature j and row 2j+1 is up feature j.

transformers' ``GptOssExperts`` holds the transposes, ``gate_up_proj`` [E, D, 2F] (gate =
``[..., ::2]``, up = ``[..., 1::2]``) and ``down_proj`` [E, F, D], and computes ``x @ W``.
``expert_weights`` and ``dequantize_experts`` return that orientation; ``quantize_experts``
takes it and gives the hub's blocks and scales.

Shape letters: E experts, D hidden, F expert FFN width, K a weight's input width (the blocked
dim), N its output width, G = K/32 blocks per row.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 32  # elements sharing one scale
SCALE_BIAS = 127  # E8M0 stores 2^(s - 127)
E2M1_EMAX = 2  # exponent of E2M1's largest magnitude, 6 = 1.5 * 2^2

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Halfway points between consecutive magnitudes; a tie goes to the even code (even mantissa).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _byte_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the two values of every byte, low nibble first."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1)


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, "
                         f"got {blocks.dtype} and {scales.dtype}")
    half = BLOCK_SIZE // 2
    if blocks.ndim < 2 or blocks.shape[-1] != half or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks [..., G, {half}] and scales [..., G] do not match: "
                         f"{tuple(blocks.shape)} and {tuple(scales.shape)}")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G*32] in `dtype`.

    Bit for bit what transformers' ``convert_moe_packed_tensors`` computes before its final
    transpose: the element is looked up in `dtype`, then scaled by ``torch.ldexp`` (so a
    product that `dtype` cannot hold rounds, or overflows, exactly as there). Works on any
    leading shape, so a loader can pass one expert (``blocks[e]``) at a time; the temporaries
    are an int32 index per byte and the output.
    """
    _check_pair(blocks, scales)
    *lead, num_blocks, half = blocks.shape
    values = _byte_table(dtype, blocks.device)[blocks.to(torch.int32)]  # [..., G, 16, 2]
    values = values.view(*lead, num_blocks, 2 * half)  # [..., G, 32]
    exponent = (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1)  # [..., G, 1]
    torch.ldexp(values, exponent, out=values)
    return values.view(*lead, num_blocks * 2 * half)  # [..., K]


def expert_weights(blocks: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype = torch.bfloat16,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert in ``GptOssExperts`` orientation: blocks [N, G, 16], scales [N, G] -> [K, N].

    For gate_up pass ``gate_up_proj_blocks[e]`` and get [D, 2F] (gate = ``[:, ::2]``, up =
    ``[:, 1::2]``); for down pass ``down_proj_blocks[e]`` and get [F, D]. The result is
    contiguous, or written into `out` (e.g. one expert's slice of a preallocated stack).
    """
    if blocks.ndim != 3:
        raise ValueError(f"expert_weights takes one expert's blocks [N, G, 16], "
                         f"got {tuple(blocks.shape)}")
    rows = dequantize(blocks, scales, dtype)  # [N, K]
    if out is None:
        return rows.T.contiguous()  # [K, N]
    return out.copy_(rows.T)


def dequantize_experts(blocks: torch.Tensor, scales: torch.Tensor,
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """All experts: blocks [E, N, G, 16], scales [E, N, G] -> [E, K, N] (``GptOssExperts``).

    Equal to transformers' ``convert_moe_packed_tensors``, but filled one expert at a time, so
    the memory beyond the result is one expert's temporaries rather than the whole layer's.
    """
    _check_pair(blocks, scales)
    if blocks.ndim != 4:
        raise ValueError(f"dequantize_experts takes blocks [E, N, G, 16], "
                         f"got {tuple(blocks.shape)}")
    num_experts, num_rows, num_blocks, half = blocks.shape
    out = torch.empty(num_experts, num_blocks * 2 * half, num_rows,
                      dtype=dtype, device=blocks.device)  # [E, K, N]
    for e in range(num_experts):
        expert_weights(blocks[e], scales[e], dtype, out=out[e])
    return out


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [..., K], K a multiple of 32 -> blocks uint8 [..., G, 16], scales uint8 [..., G].

    Blocks run along the last dim. Each block's scale follows the OCP spec: 2^(floor(log2(amax))
    - 2), clamped to E8M0's 2^-127..2^127, so the block's largest magnitude lands in [4, 8) and
    an all-zero block gets 2^-127. Each element divided by its scale rounds to the nearest E2M1
    value, ties to the even code (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), and magnitudes above
    6 saturate to 6. The sign is kept, -0.0 included.

    This is the spec's scale, not the one OpenAI's triton kernels pick (they round the scale up
    so that nothing saturates); ``dequantize`` reads either.
    """
    if not w.is_floating_point():
        raise ValueError(f"quantize takes a float tensor, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"quantize needs a last dim that is a multiple of {BLOCK_SIZE}, "
                         f"got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize takes finite values only")
    *lead, width = w.shape
    x = w.float().reshape(*lead, width // BLOCK_SIZE, BLOCK_SIZE)  # [..., G, 32]
    amax = x.abs().amax(dim=-1, keepdim=True)  # [..., G, 1]
    _, amax_exp = torch.frexp(amax)  # amax = m * 2^amax_exp, m in [0.5, 1)
    shared = torch.where(amax > 0, amax_exp - 1 - E2M1_EMAX, -SCALE_BIAS)
    shared = shared.clamp(-SCALE_BIAS, SCALE_BIAS)  # [..., G, 1]
    magnitude = torch.ldexp(x.abs(), -shared)  # [..., G, 32], exact: a power-of-two scale
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=w.device)
    for i, mid in enumerate(_MIDPOINTS):
        # Crossing midpoint i moves code i to i+1; at the tie, step only onto an even code.
        codes += (magnitude >= mid) if i % 2 else (magnitude > mid)
    codes |= torch.signbit(x).to(torch.uint8) << 3
    codes = codes.view(*lead, width // BLOCK_SIZE, BLOCK_SIZE // 2, 2)  # [..., G, 16, 2]
    blocks = codes[..., 0] | (codes[..., 1] << 4)  # [..., G, 16]
    scales = (shared.squeeze(-1) + SCALE_BIAS).to(torch.uint8)  # [..., G]
    return blocks.contiguous(), scales


def quantize_experts(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, K, N] as ``GptOssExperts`` holds it -> hub blocks [E, N, G, 16], scales [E, N, G].

    ``quantize_experts(gate_up_proj)`` gives ``gate_up_proj_blocks``/``_scales`` and
    ``quantize_experts(down_proj)`` gives ``down_proj_blocks``/``_scales``, as a GPT-OSS
    checkpoint stores them.
    """
    if weights.ndim != 3:
        raise ValueError(f"quantize_experts takes [E, K, N], got {tuple(weights.shape)}")
    return quantize(weights.transpose(1, 2))  # [E, N, K] -> blocks along K
