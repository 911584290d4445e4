"""The fused MoE compiled on a GPU (skipped without CUDA): model-sized shapes against the
fp32 reference and against torch's grouped_mm, alignment at prefill size, and a CUDA graph
capture that proves the launch path never waits on the host."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
# Importing the kernels without CUDA would decorate them uninterpreted for the whole session.
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiled kernels only (TRITON_INTERPRET=1 is set)", allow_module_level=True)
pytest.importorskip("triton")

from moeflow.ops.experts import grouped_swiglu  # noqa: E402
from moeflow.ops.triton.align import align_by_expert, align_by_expert_ref  # noqa: E402
from moeflow.ops.triton.configs import TileConfig  # noqa: E402
from moeflow.ops.triton.fused_moe import dense_moe, fused_moe, fused_moe_ref  # noqa: E402

# (T, D, F, E, A): decode and prefill at Mixtral-like and Qwen3-like expert shapes, and
# widths that are not multiples of any tile.
SHAPES = [(1, 1024, 768, 8, 2), (37, 2048, 768, 128, 8), (256, 1000, 1400, 16, 4),
          (2048, 4096, 1792, 8, 2)]


@pytest.fixture(autouse=True)
def exact_fp32():
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allow


def problem(num_tokens, hidden, ffn, num_experts, top_k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=g).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * ffn, hidden, device="cuda", generator=g)
               / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, ffn, device="cuda", generator=g)
            / ffn**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return x, gate_up, down, ids, weights


def close(out, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:
        scale = ref.abs().max().item()
        torch.testing.assert_close(out.float(), ref, rtol=2**-6, atol=2**-7 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-F{}-E{}-A{}".format(*s))
def test_fused_moe_matches_the_reference(shape, dtype):
    x, gate_up, down, ids, weights = problem(*shape, dtype)
    ref = fused_moe_ref(x, gate_up, down, ids, weights)
    close(fused_moe(x, gate_up, down, ids, weights), ref, dtype)
    close(dense_moe(x, gate_up, down, ids, weights), ref, dtype)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch has no grouped_mm")
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=lambda s: f"T{s[0]}-E{s[3]}")
def test_fused_moe_agrees_with_grouped_mm(shape):
    x, gate_up, down, ids, weights = problem(*shape, torch.bfloat16)
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # [P] pairs by expert
    ends = torch.bincount(flat, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)
    rows = grouped_swiglu(x[order // top_k], ends, gate_up, down)  # [P, D] by expert
    per_pair = torch.empty_like(rows)
    per_pair[order] = rows
    want = (per_pair.float() * weights.reshape(-1, 1)).view(num_tokens, top_k, -1).sum(1)
    close(fused_moe(x, gate_up, down, ids, weights), want, torch.bfloat16)


def test_alignment_at_prefill_size_matches_the_reference():
    ids = torch.randn(4096, 128, device="cuda").topk(8, dim=-1).indices  # [T, A]
    ids[::97, 0] = -1  # some pairs are not here
    for block_m in (16, 64):
        got = align_by_expert(ids, 128, block_m)
        want = align_by_expert_ref(ids.cpu(), 128, block_m)
        rows = int(got.num_rows)
        assert rows == int(want.num_rows)
        assert torch.equal(got.sorted_ids[:rows].cpu(), want.sorted_ids)
        assert torch.equal(got.expert_ids[:rows // block_m].cpu(), want.expert_ids)


def test_fused_moe_replays_in_a_cuda_graph():
    x, gate_up, down, ids, weights = problem(64, 1024, 768, 16, 4, torch.bfloat16)
    tiles = TileConfig(block_m=16, block_n=64, block_k=64)
    fused_moe(x, gate_up, down, ids, weights, tiles)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if anything in the launch path syncs
        out = fused_moe(x, gate_up, down, ids, weights, tiles)
    _, _, _, new_ids, new_weights = problem(64, 1024, 768, 16, 4, torch.bfloat16, seed=1)
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    graph.replay()
    close(out, fused_moe_ref(x, gate_up, down, ids, weights), torch.bfloat16)
