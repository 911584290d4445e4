"""Triton kernels: the fused MoE (align by expert, grouped GEMM with the gather in its
A-loads and SiLU-and-mul in its epilogue, down GEMM with the routed weights) and the dense
per-expert path beside it, each with a torch reference.

Names load lazily, so `import moeflow.ops.triton` imports neither triton nor torch. On the
CPU the kernels run under `TRITON_INTERPRET=1`, which must be set before triton is imported.
"""

from __future__ import annotations

from moeflow import lazy_names

_LAZY = {
    "fused_moe": "moeflow.ops.triton.fused_moe",
    "fused_moe_ref": "moeflow.ops.triton.fused_moe",
    "dense_moe": "moeflow.ops.triton.fused_moe",
    "EXPERT_KERNELS": "moeflow.ops.triton.fused_moe",
    "align_by_expert": "moeflow.ops.triton.align",
    "align_by_expert_ref": "moeflow.ops.triton.align",
    "Alignment": "moeflow.ops.triton.align",
    "TileConfig": "moeflow.ops.triton.configs",
    "get_config": "moeflow.ops.triton.configs",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_names("moeflow.ops.triton", _LAZY)
