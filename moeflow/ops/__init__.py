"""Torch reference ops for the supported MoE families (and, under `ops.triton`, kernels)."""
