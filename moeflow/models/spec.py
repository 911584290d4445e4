"""ModelSpec: the shape of an MoE language model, independent of where it came from.

A ModelSpec is plain frozen data. It is built from a Hugging Face `config.json` by a family
adapter (`moeflow.models.families`) or from a preset for simulation, and everything else in
moeflow (the graph compiler, the cost model, the weight loader, the ops) reads only this.

Shape letters used across moeflow:
    T tokens, D hidden, E experts, A top-k, F expert FFN width, H query heads,
    K key/value heads, d head dim, V vocab, L context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RouterKind = Literal["softmax_topk", "topk_softmax", "group_limited", "noaux_tc"]
QKNorm = Literal["none", "head", "full"]
AttentionKind = Literal["gqa", "mla"]
RopeScaling = Literal["default", "linear", "yarn"]
MlpKind = Literal["moe", "dense"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class SpecError(ValueError):
    """A model description is inconsistent; the message names the offending field."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Rotary position embedding. `interleaved` rotates pairs (2i, 2i+1) as DeepSeek does;
    otherwise halves are rotated (`rotate_half`, the Llama convention)."""

    theta: float
    rotary_dim: int
    interleaved: bool = False
    scaling: RopeScaling = "default"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # yarn: round the correction range to whole dims (GPT-OSS: no)
    attention_factor: float | None = None  # yarn: cos/sin scaling; None: from the factor

    def __post_init__(self) -> None:
        _require(self.theta > 0, f"rope theta must be > 0, got {self.theta}")
        _require(self.rotary_dim > 0 and self.rotary_dim % 2 == 0,
                 f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        _require(self.factor >= 1.0 or self.scaling == "default",
                 f"rope scaling factor must be >= 1, got {self.factor}")
        if self.scaling == "yarn":
            _require(self.original_max_position > 0,
                     "yarn rope scaling needs original_max_position_embeddings")


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Self-attention. For `gqa`, `head_dim` is the q/k/v head size. For `mla` (DeepSeek's
    multi-head latent attention), q/k heads are `qk_nope_head_dim + qk_rope_head_dim` wide,
    values `v_head_dim`, and the cache holds a `kv_lora_rank` latent plus the rope key."""

    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    softmax_scale: float = 0.0
    sinks: bool = False  # a learned logit per head in every softmax's denominator (GPT-OSS)

    def __post_init__(self) -> None:
        _require(self.num_heads > 0, f"num_attention_heads must be > 0, got {self.num_heads}")
        _require(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
                 f"num_key_value_heads={self.num_kv_heads} must divide "
                 f"num_attention_heads={self.num_heads}")
        _require(self.head_dim > 0, f"head_dim must be > 0, got {self.head_dim}")
        if self.kind == "mla":
            _require(self.kv_lora_rank > 0, "MLA needs kv_lora_rank > 0")
            _require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                     f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
            _require(self.v_head_dim > 0, "MLA needs v_head_dim > 0")
            _require(self.head_dim == self.qk_nope_head_dim + self.qk_rope_head_dim,
                     "MLA head_dim must equal qk_nope_head_dim + qk_rope_head_dim")
        if self.clip_qkv is not None:
            _require(self.clip_qkv > 0, f"clip_qkv must be > 0, got {self.clip_qkv}")
        if self.softmax_scale == 0.0:
            object.__setattr__(self, "softmax_scale", self.head_dim ** -0.5)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def o_width(self) -> int:
        """Width of the attention output fed to o_proj."""
        return self.num_heads * (self.v_head_dim if self.kind == "mla" else self.head_dim)

    @property
    def cache_width(self) -> int:
        """Elements cached per token per layer (K and V together)."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_width


@dataclass(frozen=True, slots=True)
class MoESpec:
    """The routed experts of an MoE layer, their router, and any shared expert."""

    num_experts: int
    top_k: int
    intermediate_size: int
    router: RouterKind = "softmax_topk"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    router_fp32: bool = False
    shared_intermediate_size: int = 0
    shared_gate: bool = False
    router_bias: bool = False  # a bias on the router logits (GPT-OSS)
    expert_bias: bool = False  # biases on the experts' gate/up and down projections
    # GPT-OSS's clamped SwiGLU: gate clamped above, up to [-limit, limit], then
    # (up + 1) * gate * sigmoid(alpha * gate); None: plain SwiGLU, silu(gate) * up
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0

    def __post_init__(self) -> None:
        _require(self.num_experts > 0, f"num_experts must be > 0, got {self.num_experts}")
        _require(1 <= self.top_k <= self.num_experts,
                 f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]")
        _require(self.intermediate_size > 0,
                 f"moe_intermediate_size must be > 0, got {self.intermediate_size}")
        _require(self.routed_scaling_factor > 0,
                 f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.router in ("group_limited", "noaux_tc"):
            _require(self.num_groups > 0 and self.num_experts % self.num_groups == 0,
                     f"n_group={self.num_groups} must divide num_experts={self.num_experts}")
            _require(1 <= self.topk_groups <= self.num_groups,
                     f"topk_group={self.topk_groups} must be in [1, n_group={self.num_groups}]")
            _require(self.top_k <= self.topk_groups * (self.num_experts // self.num_groups),
                     f"num_experts_per_tok={self.top_k} exceeds the experts in topk_group groups")
        if self.router == "noaux_tc":
            _require(self.num_experts // self.num_groups >= 2,
                     "noaux_tc scores a group by its best two experts: a group needs two")
        _require(self.shared_intermediate_size >= 0, "shared expert size must be >= 0")
        _require(not self.shared_gate or self.shared_intermediate_size > 0,
                 "a shared expert gate needs a shared expert")


@dataclass(frozen=True, slots=True)
class LayerSpec:
    mlp: MlpKind
    sliding_window: int | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything about a model's shape that execution and simulation need."""

    family: str
    vocab_size: int
    hidden_size: int
    attention: AttentionSpec
    rope: RopeSpec
    moe: MoESpec
    layers: tuple[LayerSpec, ...]
    dense_intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _require(self.vocab_size > 0, f"vocab_size must be > 0, got {self.vocab_size}")
        _require(self.hidden_size > 0, f"hidden_size must be > 0, got {self.hidden_size}")
        _require(len(self.layers) > 0, "num_hidden_layers must be > 0")
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.dtype in DTYPE_BYTES, f"unsupported dtype {self.dtype!r}; "
                 f"expected one of {sorted(DTYPE_BYTES)}")
        _require(self.max_position_embeddings > 0, "max_position_embeddings must be > 0")
        if any(layer.mlp == "dense" for layer in self.layers):
            _require(self.dense_intermediate_size > 0,
                     "dense layers need intermediate_size > 0")
        for tok in self.eos_token_ids:
            _require(0 <= tok < self.vocab_size, f"eos_token_id {tok} outside the vocabulary")

    # -- derived shapes --------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer.mlp == "moe")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def attention_params(self) -> int:
        """Parameters of one layer's attention (projections and norms)."""
        a, d = self.attention, self.hidden_size
        if a.kind == "mla":
            if a.q_lora_rank:
                q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * a.head_dim
            else:
                q = d * a.num_heads * a.head_dim
            kv = (d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
                  + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim))
            return q + kv + a.o_width * d + 2 * d
        return d * (a.q_width + 2 * a.kv_width) + a.o_width * d + 2 * d

    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU: gate, up, down)."""
        return 3 * self.hidden_size * self.moe.intermediate_size

    def shared_params(self) -> int:
        return 3 * self.hidden_size * self.moe.shared_intermediate_size + (
            self.hidden_size if self.moe.shared_gate else 0)

    def dense_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    def active_params_per_token(self) -> int:
        """Parameters one decoded token reads: attention, router, top-k experts, shared
        experts, dense MLPs, one embedding row and the LM head."""
        total = 0
        for layer in self.layers:
            total += self.attention_params()
            if layer.mlp == "moe":
                total += (self.moe.num_experts * self.hidden_size
                          + self.moe.top_k * self.expert_params() + self.shared_params())
            else:
                total += self.dense_params()
        return total + self.hidden_size + self.vocab_size * self.hidden_size + self.hidden_size

    def total_params(self) -> int:
        total = 0
        for layer in self.layers:
            total += self.attention_params()
            if layer.mlp == "moe":
                total += (self.moe.num_experts * self.hidden_size
                          + self.moe.num_experts * self.expert_params() + self.shared_params())
            else:
                total += self.dense_params()
        embed = self.vocab_size * self.hidden_size
        return total + embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size
