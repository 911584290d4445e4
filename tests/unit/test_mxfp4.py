"""MXFP4 against transformers' own dequantization and against the OCP spec written plainly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moeflow.models.mxfp4 import (
    FP4_VALUES, dequantize, dequantize_experts, expert_weights, quantize, quantize_experts,
)

transformers_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def transformers_dequantize(blocks: torch.Tensor, scales: torch.Tensor,
                            dtype: torch.dtype) -> torch.Tensor:
    """The pure-torch path GPT-OSS loading takes: [E, N, G, 16] -> [E, K, N]."""
    return transformers_mxfp4._convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def random_packed(experts: int, rows: int, groups: int, lo: int = 118, hi: int = 130,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(lo, hi + 1, (experts, rows, groups), dtype=torch.uint8, generator=gen)
    return blocks, scales


def spec_round_trip(row: list[float]) -> list[float]:
    """OCP MX v1.0 6.3 per block of 32: X = 2^(floor(log2 amax) - emax), emax = 2 for E2M1,
    clamped to E8M0; each v/X goes to the nearest E2M1 magnitude (ties to the even code),
    which saturates at 6; the sign is kept."""
    out = []
    for start in range(0, len(row), 32):
        block = row[start:start + 32]
        amax = max(abs(v) for v in block)
        shared = math.frexp(amax)[1] - 1 - 2 if amax > 0 else -127
        shared = max(-127, min(127, shared))
        for v in block:
            a = abs(v) / 2.0 ** shared
            code = min(range(8), key=lambda c: (abs(a - MAGNITUDES[c]), c % 2))
            out.append(math.copysign(MAGNITUDES[code] * 2.0 ** shared, v))
    return out


# -- dequantize ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_matches_transformers_bit_for_bit(dtype):
    blocks, scales = random_packed(experts=3, rows=24, groups=5, seed=1)
    ours = dequantize_experts(blocks, scales, dtype)
    theirs = transformers_dequantize(blocks, scales, dtype)
    assert ours.shape == (3, 5 * 32, 24)
    assert same_bits(ours, theirs)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_matches_transformers_over_every_scale_byte(dtype):
    # Subnormal, overflowing and the spec's NaN scale (255) round exactly as transformers does.
    blocks, _ = random_packed(experts=2, rows=8, groups=16, seed=2)
    scales = torch.arange(256, dtype=torch.uint8).view(2, 8, 16)
    assert same_bits(dequantize_experts(blocks, scales, dtype),
                     transformers_dequantize(blocks, scales, dtype))


def test_low_nibble_is_the_earlier_element():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x21  # low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[0, 1] = 0xF8  # low nibble 8 (-0.0), high nibble 15 (-6.0)
    values = dequantize(blocks, torch.tensor([128], dtype=torch.uint8), torch.float32)
    assert values[:4].tolist() == [1.0, 2.0, -0.0, -12.0]
    assert torch.signbit(values[2])


def test_dequantize_reads_any_leading_shape():
    blocks, scales = random_packed(experts=2, rows=3, groups=4, seed=3)
    whole = dequantize(blocks, scales, torch.float32)  # [E, N, K]
    assert whole.shape == (2, 3, 128)
    assert torch.equal(dequantize(blocks[1, 2], scales[1, 2], torch.float32), whole[1, 2])
    assert torch.equal(dequantize(blocks.flatten(0, 1), scales.flatten(0, 1), torch.float32),
                       whole.flatten(0, 1))


# -- expert by expert ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_expert_by_expert_concatenates_to_the_whole(dtype):
    blocks, scales = random_packed(experts=4, rows=40, groups=3, seed=4)
    whole = transformers_dequantize(blocks, scales, dtype)  # [E, K, N]
    experts = [expert_weights(blocks[e], scales[e], dtype) for e in range(4)]
    assert all(w.shape == (96, 40) and w.is_contiguous() for w in experts)
    assert same_bits(torch.stack(experts), whole)
    rows = [dequantize(blocks[e], scales[e], dtype) for e in range(4)]  # [N, K] each
    assert same_bits(torch.stack(rows).transpose(1, 2).contiguous(), whole)


def test_expert_weights_writes_into_a_slice():
    blocks, scales = random_packed(experts=2, rows=8, groups=2, seed=5)
    stack = torch.full((2, 64, 8), float("nan"), dtype=torch.bfloat16)
    returned = expert_weights(blocks[1], scales[1], torch.bfloat16, out=stack[1])
    assert returned.data_ptr() == stack[1].data_ptr()
    assert same_bits(stack[1], transformers_dequantize(blocks, scales, torch.bfloat16)[1])
    assert stack[0].isnan().all()


def peak_bytes(fn) -> tuple[int, torch.Tensor]:
    """Peak of CPU bytes allocated and not yet freed while `fn` runs (torch's allocation log)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streaming_peak_is_the_result_plus_one_expert(dtype):
    num_experts, rows, groups = 8, 256, 8
    blocks, scales = random_packed(num_experts, rows, groups, seed=6)
    itemsize = torch.empty((), dtype=dtype).element_size()
    out_bytes = num_experts * rows * groups * 32 * itemsize
    one_expert = rows * groups * 32 * itemsize + rows * groups * 16 * 4  # values + int32 index
    bound = out_bytes + one_expert + 64 * 1024

    peak, out = peak_bytes(lambda: dequantize_experts(blocks, scales, dtype))
    assert out.numel() * out.element_size() == out_bytes
    assert out_bytes <= peak <= bound
    # The measure sees temporaries: dequantizing the layer at once and transposing needs more.
    whole_peak, _ = peak_bytes(
        lambda: dequantize(blocks, scales, dtype).transpose(1, 2).contiguous())
    assert whole_peak > bound


# -- quantize --------------------------------------------------------------------------------

def test_quantize_shapes_are_the_hub_layout():
    num_experts, hidden, ffn = 2, 64, 96
    gate_up = torch.randn(num_experts, hidden, 2 * ffn)  # GptOssExperts.gate_up_proj [E, D, 2F]
    down = torch.randn(num_experts, ffn, hidden)  # GptOssExperts.down_proj [E, F, D]
    gu_blocks, gu_scales = quantize_experts(gate_up)
    dn_blocks, dn_scales = quantize_experts(down)
    assert gu_blocks.dtype == gu_scales.dtype == torch.uint8
    assert gu_blocks.shape == (num_experts, 2 * ffn, hidden // 32, 16)
    assert gu_scales.shape == (num_experts, 2 * ffn, hidden // 32)
    assert dn_blocks.shape == (num_experts, hidden, ffn // 32, 16)
    assert dn_scales.shape == (num_experts, hidden, ffn // 32)
    # transformers reads them back into the parameters' orientation.
    for weights, blocks, scales in ((gate_up, gu_blocks, gu_scales), (down, dn_blocks, dn_scales)):
        theirs = transformers_dequantize(blocks, scales, torch.float32)
        assert theirs.shape == weights.shape
        assert torch.equal(theirs, dequantize_experts(blocks, scales, torch.float32))
        amax = weights.abs().amax()
        assert (theirs - weights).abs().max() <= amax / 2


def spec_cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    cases = [torch.randn(6, 96, generator=gen) * 10.0 ** float(k) for k in (-30, -3, 0, 2, 30)]
    cases.append(torch.randn(6, 96, generator=gen).to(torch.bfloat16).float())
    sparse = torch.randn(6, 96, generator=gen)
    sparse[sparse.abs() < 1.0] = 0.0
    sparse[0, :32] = 0.0  # an all-zero block
    sparse[1, :32] = -0.0
    cases.append(sparse)
    cases.append(torch.tensor([1e-40, -3e-39] * 48).view(1, 96))  # subnormal floats
    return cases


@pytest.mark.parametrize("case", range(len(spec_cases())))
def test_round_trip_is_the_spec_nearest_value(case):
    w = spec_cases()[case]
    blocks, scales = quantize(w)
    assert blocks.shape == (*w.shape[:-1], w.shape[-1] // 32, 16)
    assert scales.shape == blocks.shape[:-1]
    got = dequantize(blocks, scales, torch.float32)
    want = torch.tensor([spec_round_trip(row) for row in w.tolist()], dtype=torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    # Every value is an E2M1 value times its block's scale.
    grid = torch.tensor(FP4_VALUES)
    exponent = scales.to(torch.int32) - 127
    step = torch.ldexp(torch.ones(scales.shape), exponent).unsqueeze(-1)  # [..., G, 1]
    ratio = got.view(*scales.shape, 32) / step
    assert torch.isin(ratio, grid).all()
    # The error is at most a quarter of the block's largest magnitude, or half of it where that
    # magnitude saturates (amax/X in (6, 8)).
    blockwise = w.view(*scales.shape, 32)
    amax = blockwise.abs().amax(dim=-1, keepdim=True)
    err = (got.view_as(blockwise) - blockwise).abs()
    unsaturated = amax <= 6 * step  # [..., G, 1]
    assert (err <= torch.where(unsaturated, amax / 4, amax / 2)).all()


def test_ties_go_to_the_even_code_and_large_values_saturate():
    # amax 7.5 -> scale 2^(2 - 2) = 1, so the block is on E2M1's own grid.
    halfway = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.5]
    row = torch.tensor(halfway + [-v for v in halfway] + [0.0] * 16).view(1, 32)
    blocks, scales = quantize(row)
    assert scales.tolist() == [[127]]
    got = dequantize(blocks, scales, torch.float32)[0, :16].tolist()
    rounded = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert got == rounded + [-v for v in rounded]


def test_representable_values_round_trip_exactly():
    gen = torch.Generator().manual_seed(8)
    blocks, scales = random_packed(experts=2, rows=16, groups=3, lo=100, hi=150, seed=8)
    values = dequantize(blocks, scales, torch.float32)
    again = dequantize(*quantize(values), torch.float32)
    assert torch.equal(again, values) and torch.equal(torch.signbit(again), torch.signbit(values))
    # Where a block's largest magnitude is 4 or 6 its scale is the spec's own: the bytes come back.
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).view(*scales.shape, 32)
    top = torch.randint(0, 32, scales.shape, generator=gen).unsqueeze(-1)
    codes = codes.scatter(-1, top, torch.randint(6, 8, top.shape, generator=gen, dtype=torch.uint8))
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).view(blocks.shape)
    again_blocks, again_scales = quantize(dequantize(blocks, scales, torch.float32))
    assert torch.equal(again_blocks, blocks) and torch.equal(again_scales, scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_reads_half_precision(dtype):
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(9)).to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(quantize(w), quantize(w.float())))


def test_quantize_rejects_what_it_cannot_encode():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="finite"):
        quantize(torch.tensor([float("inf")] + [0.0] * 31))
    with pytest.raises(ValueError, match="float"):
        quantize(torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match"):
        dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
