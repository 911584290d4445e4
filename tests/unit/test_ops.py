"""Each op against a plainly written reference."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moeflow.models.spec import MoESpec, RopeSpec
from moeflow.ops.attention import (
    SMALL_DECODE_PRODUCTS, decode_attention, decode_mask, prefill_attention,
)
from moeflow.ops.backend import OneThread, index_tensor, padded_experts_pay
from moeflow.ops.experts import (Activation, grouped_swiglu, grouped_swiglu_ref,
                                 padded_swiglu)
from moeflow.ops.norm import rms_norm, rms_norm_ref
from moeflow.ops.rope import (
    RopeTable, apply_half_rotation, apply_rope, half_rotation_tables, inv_frequencies,
)
from moeflow.ops.router import route


def attention_ref(q, k, v, visible, scale):
    """q [H, d] one query; k/v [L, K, *]; visible [L] bool -> [H, v]"""
    heads, kv_heads = q.shape[0], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1).float()
    v = v.repeat_interleave(heads // kv_heads, dim=1).float()
    scores = torch.einsum("hd,lhd->hl", q.float(), k) * scale
    scores[:, ~visible] = float("-inf")
    return torch.einsum("hl,lhv->hv", scores.softmax(-1), v)


@pytest.mark.parametrize("batch,length", [(1, 8), (3, 20), (2, 90), (4, 64), (6, 100)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_both_kernels_match_reference(batch, length, window):
    torch.manual_seed(batch * 100 + length)
    heads, kv_heads, d = 8, 2, 16
    lengths = torch.tensor([length - 3 * (b % 3) for b in range(batch)])
    q = torch.randn(batch, heads, d)
    k, v = torch.randn(batch, length, kv_heads, d), torch.randn(batch, length, kv_heads, d)
    mask = decode_mask(lengths, window)
    out = decode_attention(q, k, v, mask, 0.25)
    for b in range(batch):
        pos = torch.arange(length)
        visible = pos < lengths[b]
        if window is not None:
            visible &= pos > lengths[b] - 1 - window
        assert torch.allclose(out[b], attention_ref(q[b], k[b], v[b], visible, 0.25), atol=1e-5)
    # both kernels are exercised by this parametrisation
    assert any(b * n * heads * d <= SMALL_DECODE_PRODUCTS for b, n in [(1, 8), (3, 20)])
    assert any(b * n * heads * d > SMALL_DECODE_PRODUCTS for b, n in [(6, 100)])


@pytest.mark.parametrize("widen", [False, True])
@pytest.mark.parametrize("sinks", [False, True])
def test_bf16_decode_attention_matches_reference_widened_or_not(widen, sinks, monkeypatch):
    import moeflow.ops.attention as attention

    monkeypatch.setattr(attention, "_WIDEN", [widen])
    torch.manual_seed(7)
    batch, length, heads, kv_heads, d = 3, 40, 8, 2, 16
    lengths = torch.tensor([40, 37, 30])
    q = torch.randn(batch, heads, d).bfloat16()
    k = torch.randn(batch, length, kv_heads, d).bfloat16()
    v = torch.randn(batch, length, kv_heads, d).bfloat16()
    sink = torch.zeros(heads) if sinks else None  # a zero logit: one more exp(0) below
    out = decode_attention(q, k, v, decode_mask(lengths, None), 0.25, sink)
    assert out.dtype == torch.bfloat16
    for b in range(batch):
        ref = attention_ref(q[b], k[b], v[b], torch.arange(length) < lengths[b], 0.25)
        if sinks:  # the sink takes its share of each head's probability mass
            kk = k[b].repeat_interleave(heads // kv_heads, dim=1).float()
            scores = torch.einsum("hd,lhd->hl", q[b].float(), kk) * 0.25
            scores[:, lengths[b]:] = float("-inf")
            ref = ref * (scores.exp().sum(-1) / (scores.exp().sum(-1) + 1))[:, None]
        assert torch.allclose(out[b].float(), ref, atol=3e-2, rtol=2e-2)


def test_decode_mask_is_none_only_when_nothing_is_hidden():
    assert decode_mask(torch.tensor([7, 7]), None) is None
    assert decode_mask(torch.tensor([7, 7]), 7) is None
    assert decode_mask(torch.tensor([7, 7]), 3) is not None
    assert decode_mask(torch.tensor([7, 5]), None).shape == (2, 1, 1, 7)


@pytest.mark.parametrize("start,window", [(0, None), (5, None), (0, 4), (6, 3)])
def test_prefill_attention_matches_reference(start, window):
    torch.manual_seed(start)
    n, heads, kv_heads, d = 7, 4, 2, 8
    q = torch.randn(n, heads, d)
    k, v = torch.randn(start + n, kv_heads, d), torch.randn(start + n, kv_heads, d)
    out = prefill_attention(q, k, v, start, 0.3, window)
    for i in range(n):
        pos = torch.arange(start + n)
        visible = pos <= start + i
        if window is not None:
            visible &= pos > start + i - window
        assert torch.allclose(out[i], attention_ref(q[i], k, v, visible, 0.3), atol=1e-5)


def test_grouped_swiglu_matches_per_expert_loop():
    torch.manual_seed(0)
    counts = [3, 0, 5, 1, 0]
    x = torch.randn(sum(counts), 16)
    gate_up, down = torch.randn(5, 24, 16), torch.randn(5, 16, 12)
    ends = torch.tensor(counts).cumsum(0, dtype=torch.int32)
    assert torch.allclose(grouped_swiglu(x, ends, gate_up, down),
                          grouped_swiglu_ref(x, counts, gate_up, down), atol=1e-4)


def test_padded_swiglu_matches_per_expert_loop():
    torch.manual_seed(1)
    counts = [3, 0, 2, 1]
    x = torch.randn(sum(counts), 16)
    gate_up, down = torch.randn(4, 24, 16), torch.randn(4, 16, 12)
    padded = torch.zeros(4, 3, 16)  # 3 rows per expert, zeros as padding
    start = 0
    for e, n in enumerate(counts):
        padded[e, :n] = x[start:start + n]
        start += n
    out = padded_swiglu(padded, gate_up, down)
    got = torch.cat([out[e, :n] for e, n in enumerate(counts)])
    assert torch.allclose(got, grouped_swiglu_ref(x, counts, gate_up, down), atol=1e-4)


def test_expert_paths_take_biases_and_the_clamped_swiglu():
    """GPT-OSS's experts (biases, clamped SwiGLU) through the grouped and padded paths equal
    the per-expert loop, which equals the formula written out."""
    torch.manual_seed(2)
    counts = [3, 0, 2, 1]
    x = torch.randn(sum(counts), 16)
    gate_up, down = torch.randn(4, 24, 16), torch.randn(4, 16, 12)
    gu_bias, d_bias = torch.randn(4, 24), torch.randn(4, 16)
    act = Activation(limit=1.5, alpha=1.702)
    ref = grouped_swiglu_ref(x, counts, gate_up, down, gu_bias, d_bias, act)
    h = F.linear(x[:3], gate_up[0], gu_bias[0])
    gate, up = h[:, :12].clamp(max=1.5), h[:, 12:].clamp(-1.5, 1.5)
    written = F.linear((up + 1) * gate * torch.sigmoid(1.702 * gate), down[0], d_bias[0])
    assert torch.allclose(ref[:3], written, atol=1e-5)
    ends = torch.tensor(counts).cumsum(0, dtype=torch.int32)
    assert torch.allclose(grouped_swiglu(x, ends, gate_up, down, gu_bias, d_bias, act), ref,
                          atol=1e-4)
    padded = torch.zeros(4, 3, 16)
    start = 0
    for e, n in enumerate(counts):
        padded[e, :n] = x[start:start + n]
        start += n
    out = padded_swiglu(padded, gate_up, down, gu_bias, d_bias, act)
    got = torch.cat([out[e, :n] for e, n in enumerate(counts)])
    assert torch.allclose(got, ref, atol=1e-4)


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with OneThread():
        assert torch.get_num_threads() == 1
    with OneThread(active=False):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_padded_experts_pay_only_when_most_experts_have_rows():
    size = 3 * 256 * 256 * 2  # the demo model's expert, bf16
    assert not padded_experts_pay([1, 0, 0, 0, 0, 0, 1, 0], size)
    assert padded_experts_pay([4, 2, 5, 3, 4, 6, 4, 4], size)
    assert not padded_experts_pay([0, 0, 9, 0], 3 * 4096 * 14336 * 2)  # one big expert


def test_index_tensor():
    t = index_tensor([3, -1, 1 << 40])
    assert t.dtype == torch.int64 and t.tolist() == [3, -1, 1 << 40]
    assert index_tensor([]).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_families_formulation(dtype):
    x = (torch.randn(5, 64) * 4).to(dtype)
    w = torch.randn(64).to(dtype)
    # equal up to the order of the sum of squares (one pass on the CPU kernels)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6),
                               rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)


def test_half_rotation_equals_rotate_half():
    table = RopeTable(RopeSpec(theta=10000.0, rotary_dim=16))
    pos = torch.tensor([0, 3, 17, 200])
    cos, sin = table.cos_sin(pos)
    x = torch.randn(4, 3, 16)
    c, s = half_rotation_tables(cos, sin, x.dtype)
    assert torch.equal(apply_half_rotation(x, c, s), apply_rope(x, cos, sin, interleaved=False))
    # the table's own half-rotation tables, past its first size too
    for dtype in (torch.float32, torch.bfloat16):
        far = torch.tensor([5, 5000, 1])
        c, s = half_rotation_tables(*table.cos_sin(far), dtype)
        assert all(torch.equal(a, b) for a, b in zip(table.half_tables(far, dtype), (c, s)))
    # rotating by position p preserves norms and turns a vector by p * inv_freq per pair
    inter = apply_rope(x, cos, sin, interleaved=True)
    assert torch.allclose(inter.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_yarn_frequencies_blend_between_interpolation_and_extrapolation():
    base = RopeSpec(theta=10000.0, rotary_dim=64)
    yarn = RopeSpec(theta=10000.0, rotary_dim=64, scaling="yarn", factor=8.0,
                    original_max_position=512, mscale=1.0, mscale_all_dim=0.0)
    plain, one = inv_frequencies(base)
    scaled, attention_scaling = inv_frequencies(yarn)
    assert one == 1.0 and attention_scaling == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert torch.allclose(scaled[:2], plain[:2])  # high frequencies extrapolated
    assert torch.allclose(scaled[-2:], plain[-2:] / 8.0)  # low frequencies interpolated


def brute_force_topk(probs, k):
    out = []
    for row in probs.tolist():
        out.append(sorted(range(len(row)), key=lambda e: -row[e])[:k])
    return out


def test_routers():
    torch.manual_seed(3)
    logits = torch.randn(6, 8)
    probs = logits.softmax(-1)
    ids, w = route(logits, MoESpec(8, 2, 4, "softmax_topk", norm_topk_prob=False))
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in brute_force_topk(probs, 2)]
    assert torch.allclose(w, probs.gather(1, ids))
    ids_n, w_n = route(logits, MoESpec(8, 2, 4, "softmax_topk", norm_topk_prob=True))
    assert torch.allclose(w_n.sum(-1), torch.ones(6))
    ids_m, w_m = route(logits, MoESpec(8, 2, 4, "topk_softmax"))  # Mixtral: same experts
    assert torch.equal(ids_m, ids_n) and torch.allclose(w_m, w_n, atol=1e-6)
    scaled = route(logits, MoESpec(8, 2, 4, "softmax_topk", routed_scaling_factor=2.5))[1]
    assert torch.allclose(scaled, 2.5 * w)
    # group-limited: 4 groups of 2, best 2 groups by their best expert, then top-2 inside
    ids_g, _ = route(logits, MoESpec(8, 2, 4, "group_limited", num_groups=4, topk_groups=2))
    for row, chosen in zip(probs, ids_g.tolist()):
        best_groups = row.view(4, 2).max(-1).values.topk(2).indices.tolist()
        allowed = [e for g in best_groups for e in (2 * g, 2 * g + 1)]
        assert set(chosen) <= set(allowed)
        assert sorted(chosen) == sorted(sorted(allowed, key=lambda e: -row[e])[:2])


def test_attention_sinks_take_a_share_of_each_softmax():
    """A sink of -inf changes nothing; a finite one scales each row by
    sum(exp(scores)) / (sum(exp(scores)) + exp(sink)), in prefill and in decode alike."""
    torch.manual_seed(3)
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    plain = prefill_attention(q, k, v, 0, 0.3)
    assert torch.allclose(prefill_attention(q, k, v, 0, 0.3, sinks=torch.full((4,), -1e9)),
                          plain, atol=1e-6)
    sinks = torch.randn(4)
    kh = k.repeat_interleave(2, dim=1)  # [L, H, d]
    scores = torch.einsum("nhd,lhd->hnl", q, kh) * 0.3
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    mass = scores.exp().sum(-1)  # [H, n]
    share = (mass / (mass + sinks[:, None].exp())).T[..., None]  # [n, H, 1]
    with_sinks = prefill_attention(q, k, v, 0, 0.3, sinks=sinks)
    assert torch.allclose(with_sinks, plain * share, atol=1e-5)
    # the last token decoding against the five keys gives the prefill's last row
    last = decode_attention(q[None, -1], k[None], v[None], None, 0.3, sinks)
    assert torch.allclose(last[0], with_sinks[-1], atol=1e-5)


FREED_BIG_TENSORS = r"""
from moeflow.ops.backend import keep_freed_memory
import torch
kept = keep_freed_memory()
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])  # minflt
def resident():
    return int(open("/proc/self/statm").read().split()[1]) << 12  # bytes
big = torch.ones(32 << 20)  # 128 MiB: past what glibc's own threshold ever keeps
held = resident()
del big
returned = (held - resident()) / (128 << 20)
before = faults()
for i in range(8):
    torch.ones((4 + i % 4) << 20)  # 16-28 MiB, allocated, touched, freed
print(kept, returned, (faults() - before) / (8 * (22 << 20) >> 12))  # faults a page
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_tensors():
    def run(setting: str) -> tuple[bool, float, float]:
        out = subprocess.run([sys.executable, "-c", FREED_BIG_TENSORS], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "MOEFLOW_KEEP_FREED_MEMORY": setting})
        kept, returned, per_page = out.stdout.split()
        return kept == "True", float(returned), float(per_page)

    kept, returned, per_page = run("on")
    # nothing goes back to the kernel, and the freed pages serve the next tensors
    assert kept and returned < 0.05 and per_page < 0.2, (returned, per_page)
    kept, returned, _ = run("off")
    assert not kept and returned > 0.95  # glibc's own way: the big block goes back
