"""RMSNorm as the supported families define it: normalise in fp32, cast back to the input
dtype, then scale by the weight (in the weight's dtype). On the CPU, in one pass
(moeflow.ops.cpu) where the kernels are built: torch's four ops cost ~100 us a row at
decode on a 2-core machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.ops import cpu as kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] (or broadcastable to x: [G, D] for per-head weights of x
    [..., G, D]) -> [..., D]"""
    if (x.is_cpu and weight.dtype == x.dtype and 1 <= weight.dim() <= 2
            and weight.shape == x.shape[x.dim() - weight.dim():]
            and x.dtype in (torch.bfloat16, torch.float32) and kernels.available()):
        d = x.shape[-1]
        return kernels.rms_norm(x.reshape(-1, d).contiguous(), weight, eps).view(x.shape)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The families' own formulation, for tests."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
