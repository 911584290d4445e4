"""MoE routers: gate logits -> the top-k experts of each token and their weights.

Shapes: T tokens, E experts, A top-k, D hidden, G expert groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeflow.models.spec import MoESpec


Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def router_logits(x: torch.Tensor, weight: torch.Tensor, moe: MoESpec,
                  bias: torch.Tensor | None = None,
                  linear: Linear = torch.nn.functional.linear) -> torch.Tensor:
    """x [T, D], weight [E, D], bias [E] or None -> logits [T, E], through `linear` (the
    CPU worker's takes its kernels at decode: torch's bf16 GEMM cost ~100 us for a
    64 x 1024 router at one row)"""
    if moe.router_fp32:
        return linear(x.float(), weight.float(), None if bias is None else bias.float())
    return linear(x, weight, bias)


def route(logits: torch.Tensor, moe: MoESpec, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> expert ids [T, A] (int64), weights [T, A] (fp32)

    - softmax_topk: softmax over all experts, keep the top-k, renormalise if
      `norm_topk_prob`, then scale by `routed_scaling_factor` (Qwen, OLMoE, DeepSeek greedy);
    - topk_softmax: top-k logits, softmax over those k (Mixtral);
    - group_limited: softmax, keep the `topk_groups` groups with the best expert, then the
      top-k among their experts (DeepSeek-V2 `group_limited_greedy`);
    - noaux_tc: sigmoid scores; `bias` [E] (e_score_correction_bias) is added for the
      choice only: groups ranked by the sum of their best two, then the top-k in the
      `topk_groups` best; the weights are the unbiased scores, renormalised if
      `norm_topk_prob`, always scaled by `routed_scaling_factor` (DeepSeek-V3).
    """
    top_k = moe.top_k
    if moe.router == "noaux_tc":
        return _noaux_tc(logits, moe, bias)
    if moe.router == "topk_softmax":
        top_logits, ids = torch.topk(logits.float(), top_k, dim=-1)
        return ids, torch.softmax(top_logits, dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    if moe.router == "group_limited":
        num_tokens, num_experts = probs.shape
        grouped = probs.view(num_tokens, moe.num_groups, num_experts // moe.num_groups)
        best_groups = grouped.max(dim=-1).values.topk(moe.topk_groups, dim=-1).indices
        keep = torch.zeros(num_tokens, moe.num_groups, dtype=torch.bool, device=probs.device)
        keep.scatter_(1, best_groups, True)
        probs = grouped.masked_fill(~keep[:, :, None], 0.0).view(num_tokens, num_experts)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if moe.norm_topk_prob and top_k > 1:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + norm_eps(moe) if norm_eps(moe) else total)
    elif moe.routed_scaling_factor != 1.0:
        weights = weights * moe.routed_scaling_factor
    return ids, weights


def _noaux_tc(logits: torch.Tensor, moe: MoESpec, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if bias is None:
        raise ValueError("the noaux_tc router needs its e_score_correction_bias")
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float()
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, moe.num_groups, num_experts // moe.num_groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = group_scores.topk(moe.topk_groups, dim=-1).indices
    keep = torch.zeros(num_tokens, moe.num_groups, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, best_groups, True)
    choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(num_tokens, num_experts)
    ids = choice.topk(moe.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * moe.routed_scaling_factor


def norm_eps(moe: MoESpec) -> float:
    # DeepSeek's own code adds 1e-20 to the denominator; the others add nothing.
    return 1e-20 if moe.router == "group_limited" or moe.router_fp32 else 0.0
