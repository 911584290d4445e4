"""Fused MoE: SwiGLU experts over routed tokens in three launches, no per-expert loop.

Shapes: T tokens, D hidden, F FFN width, E experts held here, A top-k, P = T·A (token,
expert) pairs, R rows once the pairs are aligned by expert (P plus padding to BLOCK_M per
expert, see `align.py`), R_max its bound known without a host sync.

    x [T, D]   gate_up [E, 2F, D] (gate rows first)   down [E, D, F]
    topk_ids [T, A] (ids outside [0, E) are not here: they contribute zeros)
    topk_weights [T, A]   ->   out [T, D]

1. `align_by_expert`: sorted pair ids per expert, each expert's rows padded to BLOCK_M, the
   expert of each row block and R, all on the device.
2. `_gate_up_kernel`: per tile of BLOCK_M rows of one expert and BLOCK_N columns of 2F
   (BLOCK_N / 2 of gate, the same BLOCK_N / 2 of up), the A-loads gather rows of x by token
   (pair // A), two accumulators share each A tile, and the epilogue applies SiLU-and-mul:
   act [R_max, F], in sorted order, is all that is written.
3. `_down_kernel`: act (contiguous rows) times down[e]^T, scaled by each row's routed
   weight in fp32, scattered to its (token, slot): out [P, D]; padding rows are dropped,
   not-here blocks write zeros. A torch sum over the A slots gives [T, D].

Memory traffic per call, b bytes per element, E_hit experts that got a pair: the weights,
3·E_hit·F·D·b, come from HBM once when an expert has one row block (decode) and, beyond
that, once per GROUP_M row blocks swept together (L2 serves the rest); x is gathered
R·D·b (again per column tile, from L2); act is written and read, 2·R·F·b; out is written
P·D·b and summed to T·D·b; the alignment moves a few bytes per pair. Decode is the weights
over HBM bandwidth; at 4096 tokens the 6·R·F·D flops dominate. Unfused, SiLU-and-mul would
add a write and a read of R·2F·b and a launch.

Kernel choice: `dense_moe` is the DenseGemm side (one dense matmul per expert that got
rows, a host sync for the counts); `fused_moe` is the GroupGemm side; `EXPERT_KERNELS`
names both. `fused_moe_ref` is the fp32 reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from moeflow.ops.experts import swiglu
from moeflow.ops.triton.align import align_by_expert, max_rows
from moeflow.ops.triton.configs import INTERPRETER, TileConfig, get_config

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), sweeping GROUP_M row blocks per column so
    that neighbouring programs share weight tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
        # pointers
        x_ptr, w_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr,
        # sizes
        num_pairs, top_k, ffn, hidden, num_blocks_m,
        # strides
        stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_ar, stride_af,
        # tiles
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_blocks_m, tl.cdiv(ffn, BLOCK_N),
                                 GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:  # not here: `_down_kernel` writes the zeros
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    is_pair = pairs < num_pairs  # padding rows load zeros and give act = 0
    tokens = pairs // top_k
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < ffn
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xd  # [BM, BK]
    w_expert = w_ptr + expert * stride_we
    gate_ptrs = w_expert + cols[None, :] * stride_wn + ks[:, None] * stride_wd  # [BK, BN]
    up_ptrs = w_expert + (cols + ffn)[None, :] * stride_wn + ks[:, None] * stride_wd

    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        in_k = ks < hidden - k * BLOCK_K
        a = tl.load(x_ptrs, mask=is_pair[:, None] & in_k[None, :], other=0.0)
        w_gate = tl.load(gate_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
        w_up = tl.load(up_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's bf16 dot is wrong
            a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        gate = tl.dot(a, w_gate, gate, input_precision=PRECISION)
        up = tl.dot(a, w_up, up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        gate_ptrs += BLOCK_K * stride_wd
        up_ptrs += BLOCK_K * stride_wd

    act = gate * tl.sigmoid(gate) * up  # SiLU(gate) * up, in fp32
    act_ptrs = act_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_af
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=in_cols[None, :])


@triton.jit
def _down_kernel(
        # pointers
        act_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_rows_ptr,
        # sizes
        num_pairs, hidden, ffn, num_blocks_m,
        # strides
        stride_ar, stride_af, stride_we, stride_wd, stride_wf, stride_op, stride_od,
        # tiles
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_blocks_m, tl.cdiv(hidden, BLOCK_N),
                                 GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    is_pair = pairs < num_pairs
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < hidden
    out_ptrs = out_ptr + pairs[:, None] * stride_op + cols[None, :] * stride_od  # [BM, BN]
    out_mask = is_pair[:, None] & in_cols[None, :]
    if expert < 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty),
                 mask=out_mask)
        return
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_af  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wd + ks[:, None] * stride_wf

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(ffn, BLOCK_K)):
        in_k = ks < ffn - k * BLOCK_K
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
        if DOT_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_af
        w_ptrs += BLOCK_K * stride_wf

    routed = tl.load(topk_weights_ptr + pairs, mask=is_pair, other=0.0).to(tl.float32)
    acc = acc * routed[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def interpreted() -> bool:
    """Whether the kernels were decorated under TRITON_INTERPRET=1 (run on CPU tensors)."""
    return type(_gate_up_kernel).__name__ == "InterpretedFunction"


def device_name(device: torch.device) -> str:
    """The device part of a config key: the GPU's name, or `interpreter`."""
    if device.type == "cuda" and not interpreted():
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return INTERPRETER


def _check(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
           topk_ids: torch.Tensor, topk_weights: torch.Tensor,
           needs_triton: bool = True) -> tuple[int, int, int]:
    """Raise on inconsistent arguments; return (E, F, D). With `needs_triton`, CPU tensors
    also need the interpreter."""
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"want x [T, D], gate_up [E, 2F, D], down [E, D, F]; got "
                         f"{tuple(x.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}")
    num_experts, two_ffn, hidden = gate_up.shape
    ffn = two_ffn // 2
    if two_ffn % 2 or tuple(down.shape) != (num_experts, hidden, ffn) or x.shape[1] != hidden:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}"
                         f", down {tuple(down.shape)} (want [T, D], [E, 2F, D], [E, D, F])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] \
            or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"want topk_ids and topk_weights [T, A] with T = {x.shape[0]}; got "
                         f"{tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be integers, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if x.dtype not in DTYPES or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError(f"x, gate_up and down must share one of {DTYPES}; got "
                         f"{x.dtype}, {gate_up.dtype}, {down.dtype}")
    devices = {t.device for t in (x, gate_up, down, topk_ids, topk_weights)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if needs_triton and x.device.type != "cuda" and not interpreted():
        raise RuntimeError("fused_moe on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    return num_experts, ffn, hidden


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              config: TileConfig | None = None) -> torch.Tensor:
    """x [T, D], gate_up [E, 2F, D], down [E, D, F], topk_ids [T, A], topk_weights [T, A]
    -> [T, D] in x's dtype: sum over a of topk_weights[t, a] · expert topk_ids[t, a](x[t]).

    `config` picks the tiles; by default the table for this shape and device, or a default
    (see `configs.py`). Launches sized from R_max: no host sync."""
    num_experts, ffn, hidden = _check(x, gate_up, down, topk_ids, topk_weights)
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    if config is None:
        config = get_config(num_experts, ffn, hidden, top_k, str(x.dtype),
                            device_name(x.device), num_tokens)
    block_m = config.block_m
    num_pairs = num_tokens * top_k
    sorted_ids, expert_ids, num_rows = align_by_expert(topk_ids, num_experts, block_m)
    num_blocks_m = triton.cdiv(max_rows(num_pairs, num_experts, block_m), block_m)
    act = torch.empty(sorted_ids.numel(), ffn, dtype=x.dtype, device=x.device)  # [R_max, F]
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [P, D]
    weights = topk_weights.reshape(-1).contiguous()  # [P]

    on_interpreter = interpreted()
    allow_tf32 = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    meta = dict(BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                GROUP_M=config.group_m, DOT_FP32=on_interpreter and x.dtype != torch.float32,
                PRECISION="tf32" if allow_tf32 and not on_interpreter else "ieee",
                num_warps=config.num_warps, num_stages=config.num_stages)
    # A gate_up tile of BLOCK_N columns is BLOCK_N / 2 gate and BLOCK_N / 2 up columns.
    grid = (num_blocks_m * triton.cdiv(ffn, config.block_n // 2),)
    _gate_up_kernel[grid](
        x, gate_up, act, sorted_ids, expert_ids, num_rows,
        num_pairs, top_k, ffn, hidden, num_blocks_m,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        act.stride(0), act.stride(1), **dict(meta, BLOCK_N=config.block_n // 2))
    grid = (num_blocks_m * triton.cdiv(hidden, config.block_n),)
    _down_kernel[grid](
        act, down, out, weights, sorted_ids, expert_ids, num_rows,
        num_pairs, hidden, ffn, num_blocks_m,
        act.stride(0), act.stride(1), down.stride(0), down.stride(1), down.stride(2),
        out.stride(0), out.stride(1), **meta)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, D]


def fused_moe_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Reference for `fused_moe`, in fp32 (returns fp32): every expert runs on every token
    and a [T, E] matrix of routed weights combines them. Tests and benchmarks only."""
    num_experts = gate_up.shape[0]
    here = (topk_ids >= 0) & (topk_ids < num_experts)
    combine = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    combine.scatter_add_(1, topk_ids.long().clamp(0, num_experts - 1),
                         topk_weights.float() * here)  # [T, E]
    xf = x.float()
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        out += combine[:, e, None] * swiglu(xf, gate_up[e].float(), down[e].float())
    return out  # [T, D]


def dense_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              config: TileConfig | None = None) -> torch.Tensor:
    """`fused_moe`'s interface as DenseGemm: pairs sorted by expert, then one dense SwiGLU
    per expert that got rows, in x's dtype. Syncs with the host for the counts; `config` is
    accepted for a common signature and ignored."""
    num_experts, _, hidden = _check(x, gate_up, down, topk_ids, topk_weights,
                                    needs_triton=False)
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()  # [P]
    buckets = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(buckets, stable=True)  # [P] pair ids by expert
    counts = torch.bincount(buckets, minlength=num_experts + 1).tolist()
    weights = topk_weights.reshape(-1)  # [P]
    out = x.new_zeros(num_tokens * top_k, hidden)  # [P, D]
    start = 0
    for e, count in enumerate(counts[:num_experts]):
        if count:
            pairs = order[start:start + count]
            y = swiglu(x[pairs // top_k], gate_up[e], down[e])  # [count, D]
            out[pairs] = (y * weights[pairs, None]).to(x.dtype)
        start += count
    return out.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, D]


# The kernel-choice names (EPS-MoE's GroupGemm and DenseGemm): one signature, two kernels.
EXPERT_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"group": fused_moe, "dense": dense_moe}
