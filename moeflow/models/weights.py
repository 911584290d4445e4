"""Model weights in the layout the ops want.

Two parts, loaded separately so each device holds only what it runs:

- `DenseWeights`: embeddings, norms, attention, routers, shared experts and dense MLPs.
  Every device that serves requests needs them. Tensors whose layout already fits are views
  of the memory-mapped checkpoint (no copy), but for the large ones decode streams (below);
  q/k/v and gate/up pairs are fused into one matrix each, which is the one copy those bytes
  get.
- `ExpertStack`: the routed experts one device owns in one layer, stacked as
  gate_up [E, 2F, D] and down [E, D, F] for grouped matmul.

Weights a decode step streams whole (the expert stacks, the fused QKV, the output projection
and the LM head) are held on memory advised for transparent huge pages (`host_empty`; the
output projection and the LM head are copied out of the checkpoint's mapping for it). Each
kernel reads a few MB that the previous kernel's stream has pushed out of the TLB; on 4 KiB
pages every 4 KiB costs a page walk, on 2 MiB pages one walk covers 512 times the bytes.
On a 2-core EPYC a cold bf16 GEMV of 8 MB read 25.6 GB/s on small pages and 46.9 on huge
ones, and a batch-1 decode step of the benchmark checkpoint (`benchmarks/engine.py --only
between`, four runs of each in turn) took 11.5-14.1 ms against 13.2-16.7.

Every tensor is checked against the ModelSpec's shapes; a mismatch names the file and key.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field, fields
from math import prod

import torch

from moeflow.models.checkpoint import Checkpoint
from moeflow.models.families import Family, family_of
from moeflow.models.spec import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


HUGE_PAGE = 2 << 20
HUGE_MIN = HUGE_PAGE  # bytes: a host tensor this large goes on memory advised as huge pages


def huge_pages_for(nbytes: int) -> bool:
    """Whether `host_empty` puts a weight of `nbytes` on huge pages."""
    return (nbytes >= HUGE_MIN and hasattr(mmap, "MADV_HUGEPAGE")
            and os.environ.get("MOEFLOW_HUGE_PAGES", "").lower() not in ("0", "off", "false",
                                                                         "no"))


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty` for a tensor kernels read from host memory (a weight, a KV pool): one
    of HUGE_MIN bytes or more is an anonymous mapping advised for transparent huge pages
    (Linux; elsewhere, or with MOEFLOW_HUGE_PAGES=off, plain torch.empty). Decode streams
    each weight once per token, a few MB at a time, from memory the previous kernel left the
    TLB cold for: on 2 MiB pages a walk covers 512 times the bytes (see the module's
    docstring for the figures)."""
    nbytes = prod(shape) * dtype.itemsize
    if not huge_pages_for(nbytes):
        return torch.empty(shape, dtype=dtype)
    try:  # whole huge pages: the kernel then maps it at a huge page boundary
        region = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE,
                           flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(shape, dtype=dtype)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: small pages, as torch.empty would give
        pass
    # the tensor holds the mapping (through the buffer it exports) and unmaps it when freed
    return torch.frombuffer(region, dtype=dtype, count=prod(shape)).view(shape)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of "
                         f"{', '.join(TORCH_DTYPES)}") from None


@dataclass
class AttentionWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    o: torch.Tensor
    o_bias: torch.Tensor | None = None
    # GQA
    qkv: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    qk_norm_heads: torch.Tensor | None = None  # [H + K, d]: q_norm per q head, then k_norm
    sinks: torch.Tensor | None = None  # [H] a logit per head in the softmax's denominator
    # MLA
    q: torch.Tensor | None = None
    q_a: torch.Tensor | None = None
    q_a_norm: torch.Tensor | None = None
    q_b: torch.Tensor | None = None
    kv_a: torch.Tensor | None = None
    kv_a_norm: torch.Tensor | None = None
    kv_b: torch.Tensor | None = None


@dataclass
class LayerWeights:
    attn: AttentionWeights
    router: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None  # added to the router logits [E] (GPT-OSS)
    score_bias: torch.Tensor | None = None  # noaux_tc's e_score_correction_bias [E]
    shared_gate_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None
    dense_gate_up: torch.Tensor | None = None
    dense_down: torch.Tensor | None = None


@dataclass
class DenseWeights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[LayerWeights] = field(default_factory=list)


@dataclass
class ExpertStack:
    """Routed experts of one layer held by one device, in the order of `experts`."""

    experts: tuple[int, ...]
    gate_up: torch.Tensor  # [E, 2F, D]
    down: torch.Tensor  # [E, D, F]
    gate_up_bias: torch.Tensor | None = None  # [E, 2F]
    down_bias: torch.Tensor | None = None  # [E, D]


def to_device(obj: object, device: torch.device) -> None:
    """Move every tensor field of a weights dataclass (recursively) to `device`, in place."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            setattr(obj, f.name, value.to(device))
        elif isinstance(value, list):
            for item in value:
                to_device(item, device)
        elif hasattr(value, "__dataclass_fields__"):
            to_device(value, device)


class WeightLoader:
    """Reads tensors for `spec` out of `checkpoint`, converted to `dtype`."""

    def __init__(self, spec: ModelSpec, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        self.spec = spec
        self.ckpt = checkpoint
        self.dtype = dtype
        self.family: Family = family_of(spec)

    def _get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.ckpt.get(key, shape).to(self.dtype)

    def _streamed(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A weight every decode step reads whole, copied out of the checkpoint's mapping
        onto huge pages if it is large enough (`host_empty`)."""
        t = self._get(key, shape)
        if not huge_pages_for(t.numel() * t.element_size()):
            return t
        return host_empty(tuple(t.shape), t.dtype).copy_(t)

    def _cat(self, parts: list[tuple[str, tuple[int, ...]]]) -> torch.Tensor:
        tensors = [self.ckpt.get(key, shape) for key, shape in parts]
        out = host_empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), self.dtype)
        return torch.cat([t.to(self.dtype) for t in tensors], dim=0, out=out)

    def dense(self) -> DenseWeights:
        spec, fam = self.spec, self.family
        d, v = spec.hidden_size, spec.vocab_size
        embed = self._get("model.embed_tokens.weight", (v, d))
        if spec.tie_word_embeddings and "lm_head.weight" not in self.ckpt:
            lm_head = embed
        else:
            lm_head = self._streamed("lm_head.weight", (v, d))
        weights = DenseWeights(embed=embed, final_norm=self._get("model.norm.weight", (d,)),
                               lm_head=lm_head)
        for i, layer in enumerate(spec.layers):
            lw = LayerWeights(attn=self._attention(i))
            if layer.mlp == "moe":
                moe = spec.moe
                lw.router = self._get(fam.router_key(i), (moe.num_experts, d))
                if moe.router == "noaux_tc":
                    lw.score_bias = self._get(fam.score_bias_key(i), (moe.num_experts,))
                if moe.router_bias:
                    lw.router_bias = self._get(fam.router_key(i, "bias"), (moe.num_experts,))
                if moe.shared_intermediate_size:
                    f = moe.shared_intermediate_size
                    lw.shared_gate_up = self._cat([(fam.shared_key(i, "gate"), (f, d)),
                                                   (fam.shared_key(i, "up"), (f, d))])
                    lw.shared_down = self._get(fam.shared_key(i, "down"), (d, f))
                    if moe.shared_gate:
                        lw.shared_gate = self._get(fam.shared_gate_key(i), (1, d))
            else:
                f = spec.dense_intermediate_size
                lw.dense_gate_up = self._cat([(fam.dense_key(i, "gate"), (f, d)),
                                              (fam.dense_key(i, "up"), (f, d))])
                lw.dense_down = self._get(fam.dense_key(i, "down"), (d, f))
            weights.layers.append(lw)
        return weights

    def _attention(self, i: int) -> AttentionWeights:
        spec, fam, a = self.spec, self.family, self.spec.attention
        d = spec.hidden_size
        key = fam.attn_key
        w = AttentionWeights(
            input_norm=self._get(fam.layer_key(i, "input_layernorm.weight"), (d,)),
            post_norm=self._get(fam.layer_key(i, "post_attention_layernorm.weight"), (d,)),
            o=self._streamed(key(i, "o_proj"), (d, a.o_width)))
        if a.o_bias:
            w.o_bias = self._get(key(i, "o_proj", "bias"), (d,))
        if a.sinks:
            w.sinks = self._get(fam.layer_key(i, "self_attn.sinks"), (a.num_heads,))
        if a.kind == "mla":
            qk = a.num_heads * a.head_dim
            if a.q_lora_rank:
                r = a.q_lora_rank
                w.q_a = self._get(key(i, "q_a_proj"), (r, d))
                w.q_a_norm = self._get(key(i, "q_a_layernorm"), (r,))
                w.q_b = self._get(key(i, "q_b_proj"), (qk, r))
            else:
                w.q = self._get(key(i, "q_proj"), (qk, d))
            w.kv_a = self._get(key(i, "kv_a_proj_with_mqa"), (a.kv_lora_rank + a.qk_rope_head_dim, d))
            w.kv_a_norm = self._get(key(i, "kv_a_layernorm"), (a.kv_lora_rank,))
            w.kv_b = self._get(key(i, "kv_b_proj"),
                               (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank))
            return w
        w.qkv = self._cat([(key(i, "q_proj"), (a.q_width, d)), (key(i, "k_proj"), (a.kv_width, d)),
                           (key(i, "v_proj"), (a.kv_width, d))])
        if a.qkv_bias:
            w.qkv_bias = self._cat([(key(i, "q_proj", "bias"), (a.q_width,)),
                                    (key(i, "k_proj", "bias"), (a.kv_width,)),
                                    (key(i, "v_proj", "bias"), (a.kv_width,))])
        if a.qk_norm == "head":
            w.q_norm = self._get(key(i, "q_norm"), (a.head_dim,))
            w.k_norm = self._get(key(i, "k_norm"), (a.head_dim,))
            w.qk_norm_heads = torch.cat((w.q_norm.expand(a.num_heads, -1),
                                         w.k_norm.expand(a.num_kv_heads, -1)))
        elif a.qk_norm == "full":
            w.q_norm = self._get(key(i, "q_norm"), (a.q_width,))
            w.k_norm = self._get(key(i, "k_norm"), (a.kv_width,))
        return w

    def experts(self, layer: int, experts: tuple[int, ...]) -> ExpertStack:
        """Stack the routed experts `experts` of `layer` (checked to exist and fit)."""
        spec, fam = self.spec, self.family
        if spec.layers[layer].mlp != "moe":
            raise ValueError(f"layer {layer} is dense; it has no routed experts")
        d, f = spec.hidden_size, spec.moe.intermediate_size
        for e in experts:
            if not 0 <= e < spec.moe.num_experts:
                raise ValueError(f"expert {e} out of range [0, {spec.moe.num_experts})")
        if fam.fused_experts:
            return self._fused_experts(layer, experts)
        gate_up = host_empty((len(experts), 2 * f, d), self.dtype)
        down = host_empty((len(experts), d, f), self.dtype)
        for j, e in enumerate(experts):
            gate_up[j, :f].copy_(self.ckpt.get(fam.expert_key(layer, e, "gate"), (f, d)))
            gate_up[j, f:].copy_(self.ckpt.get(fam.expert_key(layer, e, "up"), (f, d)))
            down[j].copy_(self.ckpt.get(fam.expert_key(layer, e, "down"), (d, f)))
        return ExpertStack(tuple(experts), gate_up, down)

    def _fused_experts(self, layer: int, experts: tuple[int, ...]) -> ExpertStack:
        """Experts stored as one tensor per layer (GPT-OSS): gate_up_proj [E, D, 2F] with
        gate and up interleaved in the last dim, down_proj [E, F, D], and their biases;
        taken expert by expert into the [2F, D] (gate rows first) and [D, F] layout. MXFP4
        experts (`*_blocks`, `*_scales`, moeflow.models.mxfp4) are dequantized here, one
        expert at a time, so memory peaks near the dequantized size."""
        spec, fam = self.spec, self.family
        d, f, n = spec.hidden_size, spec.moe.intermediate_size, spec.moe.num_experts
        key = fam.fused_expert_key
        gate_up = host_empty((len(experts), 2 * f, d), self.dtype)
        down = host_empty((len(experts), d, f), self.dtype)
        if key(layer, "gate_up_proj_blocks") in self.ckpt:
            from moeflow.models.mxfp4 import BLOCK_SIZE, dequantize

            if d % BLOCK_SIZE or f % BLOCK_SIZE:
                raise ValueError(f"MXFP4 experts need hidden_size and intermediate_size "
                                 f"divisible by {BLOCK_SIZE}, got {d} and {f}")
            gb = self.ckpt.get(key(layer, "gate_up_proj_blocks"), (n, 2 * f, d // 32, 16))
            gs = self.ckpt.get(key(layer, "gate_up_proj_scales"), (n, 2 * f, d // 32))
            db = self.ckpt.get(key(layer, "down_proj_blocks"), (n, d, f // 32, 16))
            ds = self.ckpt.get(key(layer, "down_proj_scales"), (n, d, f // 32))
            for j, e in enumerate(experts):
                rows = dequantize(gb[e], gs[e], self.dtype)  # [2F, D], gate/up interleaved
                gate_up[j, :f].copy_(rows[0::2])
                gate_up[j, f:].copy_(rows[1::2])
                down[j].copy_(dequantize(db[e], ds[e], self.dtype))  # [D, F]
        else:
            gu = self.ckpt.get(key(layer, "gate_up_proj"), (n, d, 2 * f))
            dn = self.ckpt.get(key(layer, "down_proj"), (n, f, d))
            for j, e in enumerate(experts):
                gate_up[j, :f].copy_(gu[e, :, 0::2].T)
                gate_up[j, f:].copy_(gu[e, :, 1::2].T)
                down[j].copy_(dn[e].T)
        stack = ExpertStack(tuple(experts), gate_up, down)
        if spec.moe.expert_bias:
            gub = self.ckpt.get(key(layer, "gate_up_proj_bias"), (n, 2 * f))
            index = torch.tensor(experts, dtype=torch.int64)
            stack.gate_up_bias = torch.cat((gub[index, 0::2], gub[index, 1::2]), dim=1).to(
                self.dtype)
            stack.down_bias = self.ckpt.get(key(layer, "down_proj_bias"), (n, d))[index].to(
                self.dtype)
        return stack
