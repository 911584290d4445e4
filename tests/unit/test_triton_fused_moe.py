"""The fused MoE kernels against their torch references: under TRITON_INTERPRET=1 on the
CPU (small shapes: the interpreter pays per program and per loop step), compiled on a GPU
when there is one. The larger GPU checks live in tests/gpu/test_triton_fused_moe_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
pytest.importorskip("triton")

from moeflow.ops.triton.align import align_by_expert, align_by_expert_ref, max_rows  # noqa: E402
from moeflow.ops.triton.configs import (  # noqa: E402
    CONFIG_DIR, INTERPRETER, TileConfig, config_key, default_config, get_config, load_configs,
    write_configs)
from moeflow.ops.triton.fused_moe import (  # noqa: E402
    EXPERT_KERNELS, dense_moe, device_name, fused_moe, fused_moe_ref, interpreted)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not interpreted():
    raise RuntimeError("moeflow.ops.triton was imported before TRITON_INTERPRET=1 was set; "
                       "set it before anything imports the kernels (e.g. in tests/conftest.py)")
TILES = TileConfig(block_m=16, block_n=32, block_k=16)
D, F, E, A = 32, 32, 4, 2
# bf16 keeps 8 significant bits; act and each slot's output are rounded once (truncated by
# the interpreter) and the top-k sum once more.
BF16_RTOL = 2**-6


def routing(num_tokens: int, num_experts: int = E, top_k: int = A, seed: int = 0,
            experts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k ids per token from `experts` (default all) and softmax weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(num_experts))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]]
                       for _ in range(num_tokens)])  # [T, A]
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=g), dim=-1)
    return ids.to(DEVICE), weights.to(DEVICE)


def experts(dtype: torch.dtype, hidden: int = D, ffn: int = F, num_experts: int = E,
            seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=g) / hidden**0.5
    down = torch.randn(num_experts, hidden, ffn, generator=g) / ffn**0.5
    return gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def tokens(num_tokens: int, dtype: torch.dtype, hidden: int = D, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)


def assert_matches_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        scale = ref.abs().max().item()
        torch.testing.assert_close(out.float(), ref, rtol=BF16_RTOL, atol=BF16_RTOL * scale)


# --- alignment ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, top_k, num_experts, block_m", [
    (1, 1, 4, 16), (5, 2, 4, 16), (8, 2, 4, 4), (40, 3, 5, 16), (70, 1, 3, 16)])
def test_alignment_matches_the_reference(num_tokens, top_k, num_experts, block_m):
    ids, _ = routing(num_tokens, num_experts, top_k)
    got = align_by_expert(ids, num_experts, block_m)
    want = align_by_expert_ref(ids.cpu(), num_experts, block_m)
    rows = int(got.num_rows)
    assert rows == int(want.num_rows)
    assert torch.equal(got.sorted_ids[:rows].cpu(), want.sorted_ids)
    assert torch.equal(got.expert_ids[:rows // block_m].cpu(), want.expert_ids)


def test_alignment_invariants_with_an_empty_expert_and_pairs_not_here():
    num_tokens, block_m = 6, 4
    ids, _ = routing(num_tokens, experts=[0, 2, 3])  # expert 1 gets nothing
    ids[0, 1], ids[3, 0] = -1, E + 2  # held by another rank
    num_pairs = ids.numel()
    sorted_ids, expert_ids, num_rows = align_by_expert(ids, E, block_m)
    rows = int(num_rows)
    assert sorted_ids.numel() == max_rows(num_pairs, E, block_m) >= rows
    assert rows % block_m == 0 and expert_ids.numel() * block_m >= sorted_ids.numel()
    flat = ids.reshape(-1).tolist()
    used = sorted_ids[:rows].tolist()
    real = [p for p in used if p != num_pairs]
    assert sorted(real) == list(range(num_pairs))  # every pair exactly once
    assert set(sorted_ids[rows:].tolist()) <= {num_pairs}  # padding is marked
    for block in range(rows // block_m):
        expert = int(expert_ids[block])
        pairs = [p for p in used[block * block_m:(block + 1) * block_m] if p != num_pairs]
        assert pairs, "a block in use holds at least one pair"
        want = {flat[p] if 0 <= flat[p] < E else -1 for p in pairs}
        assert want == {expert}  # one expert per block; -1 for not here
    assert 1 not in expert_ids.tolist()
    assert set(expert_ids[rows // block_m:].tolist()) <= {-1}


def test_alignment_of_no_pairs():
    sorted_ids, expert_ids, num_rows = align_by_expert(
        torch.zeros(0, 2, dtype=torch.int64, device=DEVICE), E, 16)
    assert int(num_rows) == 0 and sorted_ids.numel() == 0 and expert_ids.numel() == 0


# --- fused MoE --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_fused_moe_matches_the_reference(dtype, num_tokens):
    gate_up, down = experts(dtype)
    ids, weights = routing(num_tokens)
    x = tokens(num_tokens, dtype)
    out = fused_moe(x, gate_up, down, ids, weights, TILES)
    assert_matches_ref(out, fused_moe_ref(x, gate_up, down, ids, weights), dtype)


def test_ragged_widths_an_empty_expert_and_a_strided_x():
    hidden, ffn = 48, 40  # neither a multiple of the 16-wide tiles
    gate_up, down = experts(torch.float32, hidden, ffn)
    ids, weights = routing(7, experts=[0, 1, 3])
    x = tokens(7, torch.float32, 2 * hidden)[:, ::2]
    assert not x.is_contiguous()
    out = fused_moe(x, gate_up, down, ids, weights, TILES)
    assert_matches_ref(out, fused_moe_ref(x, gate_up, down, ids, weights), torch.float32)


def test_pairs_not_here_contribute_nothing():
    gate_up, down = experts(torch.float32)
    ids, weights = routing(4)
    ids[1, 0], ids[2, 1] = -1, E
    x = tokens(4, torch.float32)
    out = fused_moe(x, gate_up, down, ids, weights, TILES)
    here = weights * ((ids >= 0) & (ids < E))
    ref = fused_moe_ref(x, gate_up, down, ids.clamp(0, E - 1), here)
    assert_matches_ref(out, ref, torch.float32)


def test_the_config_table_is_used_by_default():
    gate_up, down = experts(torch.bfloat16)
    ids, weights = routing(3)
    x = tokens(3, torch.bfloat16)
    out = fused_moe(x, gate_up, down, ids, weights)  # tiles looked up
    assert_matches_ref(out, fused_moe_ref(x, gate_up, down, ids, weights), torch.bfloat16)
    assert fused_moe(x[:0], gate_up, down, ids[:0], weights[:0]).shape == (0, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_matches_the_reference(dtype):
    gate_up, down = experts(dtype)
    ids, weights = routing(5, experts=[1, 2, 3])
    ids[0, 0] = -1
    x = tokens(5, dtype)
    ref = fused_moe_ref(x, gate_up, down, ids, weights)
    assert_matches_ref(EXPERT_KERNELS["dense"](x, gate_up, down, ids, weights), ref, dtype)
    assert EXPERT_KERNELS["group"] is fused_moe and EXPERT_KERNELS["dense"] is dense_moe


def test_bad_arguments_are_refused():
    gate_up, down = experts(torch.float32)
    ids, weights = routing(2)
    x = tokens(2, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        fused_moe(x, gate_up, down.transpose(1, 2)[:, :, :16], ids, weights)
    with pytest.raises(ValueError, match="share one of"):
        fused_moe(x.double(), gate_up, down, ids, weights)
    with pytest.raises(ValueError, match="integers"):
        fused_moe(x, gate_up, down, ids.float(), weights)
    with pytest.raises(ValueError, match=r"\[T, A\]"):
        fused_moe(x, gate_up, down, ids[:1], weights[:1])


# --- configs --------------------------------------------------------------------------------

def test_config_lookup_takes_the_nearest_token_count_or_the_default(tmp_path):
    table = {1: TileConfig(16, 64, 128), 64: TileConfig(64, 64, 64, group_m=8)}
    key = config_key(8, 14336, 4096, "torch.bfloat16", "NVIDIA H200")
    assert key == "E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H200"
    write_configs(tmp_path / f"{key}.json", table, "test")
    assert load_configs(key, tmp_path) == table
    look = dict(num_experts=8, ffn=14336, hidden=4096, top_k=2, dtype="bfloat16",
                device="NVIDIA_H200", config_dir=tmp_path)
    assert get_config(num_tokens=2, **look) == table[1]
    assert get_config(num_tokens=40, **look) == table[64]
    assert get_config(num_tokens=4096, **look) == table[64]
    other = dict(look, device="NVIDIA_A100")
    assert get_config(num_tokens=4096, **other) == default_config(4096, 8, 2, "NVIDIA_A100")
    assert default_config(1, 128, 8, "x").block_m == 16
    assert default_config(4096, 8, 2, "x").block_m == 128


def test_the_shipped_tables_load_and_the_interpreter_has_one():
    for path in CONFIG_DIR.glob("*.json"):
        assert load_configs(path.stem), path.name
    assert get_config(E, F, D, A, "bfloat16", INTERPRETER, 8) == TileConfig(16, 32, 16)
    if DEVICE.type == "cpu":
        assert device_name(DEVICE) == INTERPRETER


def test_tile_configs_are_validated():
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_m=24)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_n=16)
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(num_warps=0)
