"""Family adapters: a Hugging Face `config.json` becomes a ModelSpec, and each weight a
model needs gets its checkpoint key name.

One adapter per `model_type`: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
deepseek_v3, gpt_oss. Adapters
read a value under every name transformers and the hub write it: `rope_theta` +
`rope_scaling` (most published checkpoints) and `rope_parameters` (newer transformers),
`num_experts` and `num_local_experts`, `torch_dtype` and `dtype`. A quantized checkpoint
is refused, naming its method. Every error names the config file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moeflow.models.spec import (
    AttentionSpec,
    LayerSpec,
    ModelSpec,
    MoESpec,
    RopeSpec,
    SpecError,
)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class ConfigError(ValueError):
    """config.json is missing, unreadable, of an unknown family, or out of range."""


class Fields:
    """Typed access to a config dict; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def _get(self, key: str, default: Any, required: bool) -> Any:
        value = self.data.get(key)
        if value is None:
            if required and default is None:
                raise self.error(f"required field {key!r} is missing")
            return default
        return value

    def named(self, *keys: str) -> str:
        """The first of `keys` (names transformers and the hub use for one value) that the
        config has, else the first."""
        return next((k for k in keys if self.data.get(k) is not None), keys[0])

    def integer(self, key: str, default: int | None = None, *, required: bool = False,
            minimum: int | None = None) -> int:
        value = self._get(key, default, required)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"field {key!r} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(f"field {key!r} must be >= {minimum}, got {value}")
        return value

    def opt_integer(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.integer(key)

    def number(self, key: str, default: float | None = None, *, required: bool = False) -> float:
        value = self._get(key, default, required)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"field {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.error(f"field {key!r} must be finite, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            raise self.error(f"field {key!r} must be true or false, got {value!r}")
        return value

    def text(self, key: str, default: str) -> str:
        value = self._get(key, default, False)
        if not isinstance(value, str):
            raise self.error(f"field {key!r} must be a string, got {value!r}")
        return value

    def integers(self, key: str) -> list[int]:
        value = self._get(key, [], False)
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.error(f"field {key!r} must be a list of integers, got {value!r}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return tuple(value)
        raise self.error(f"field {key!r} must be a token id or a list of them, got {value!r}")


# -- shared parsing ------------------------------------------------------------------


def _rope(f: Fields, rotary_dim: int, default_theta: float, interleaved: bool) -> RopeSpec:
    params = f.data.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta_src, scaling = params, params
    else:
        theta_src, scaling = f.data, f.data.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise f.error(f"field 'rope_scaling' must be an object, got {scaling!r}")
    theta = Fields(theta_src, f.source).number("rope_theta", default_theta)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear", "yarn"):
        raise f.error(f"rope scaling type {kind!r} is not supported "
                      "(supported: default, linear, yarn)")
    s = Fields(scaling, f.source)
    if kind == "default":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, interleaved=interleaved)
    factor = s.number("factor", required=True)
    if kind == "linear":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, interleaved=interleaved,
                        scaling="linear", factor=factor)
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise f.error(f"rope scaling field 'truncate' must be true or false, got {truncate!r}")
    return RopeSpec(
        theta=theta, rotary_dim=rotary_dim, interleaved=interleaved, scaling="yarn",
        factor=factor,
        original_max_position=s.integer("original_max_position_embeddings", required=True),
        beta_fast=s.number("beta_fast", 32.0), beta_slow=s.number("beta_slow", 1.0),
        mscale=s.number("mscale", 0.0), mscale_all_dim=s.number("mscale_all_dim", 0.0),
        truncate=truncate, attention_factor=(None if scaling.get("attention_factor") is None
                                             else s.number("attention_factor")))


def _common(f: Fields) -> dict[str, Any]:
    return dict(
        vocab_size=f.integer("vocab_size", required=True, minimum=1),
        hidden_size=f.integer("hidden_size", required=True, minimum=1),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
        max_position_embeddings=f.integer("max_position_embeddings", 4096, minimum=1),
        dtype=_dtype(f),
        bos_token_id=f.opt_integer("bos_token_id"),
        eos_token_ids=f.token_ids("eos_token_id"),
    )


def _dtype(f: Fields) -> str:
    key = f.named("dtype", "torch_dtype")
    value = f.data.get(key) or "bfloat16"
    if value not in ("float32", "bfloat16", "float16"):
        raise f.error(f"field {key!r} must be float32, bfloat16 or float16, got {value!r}")
    return str(value)


def _check_act(f: Fields) -> None:
    act = f.text("hidden_act", "silu")
    if act != "silu":
        raise f.error(f"field 'hidden_act' must be 'silu' (SwiGLU experts), got {act!r}")


def _gqa(f: Fields, *, qkv_bias: bool = False, o_bias: bool = False,
         qk_norm: str = "none", clip_qkv: float | None = None) -> AttentionSpec:
    hidden = f.integer("hidden_size", required=True, minimum=1)
    heads = f.integer("num_attention_heads", required=True, minimum=1)
    kv_heads = f.integer("num_key_value_heads", heads, minimum=1)
    head_dim = f.integer("head_dim", hidden // heads, minimum=1)
    return AttentionSpec(kind="gqa", num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,  # type: ignore[arg-type]
                         clip_qkv=clip_qkv)


# -- families ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpertKeys:
    moe_prefix: str  # "block_sparse_moe." or "mlp."
    gate: str
    up: str
    down: str
    shared_prefix: str = ""  # "mlp.shared_expert." / "mlp.shared_experts."


class Family:
    """Adapter for one `model_type`. `defaults`: what transformers' config class of the
    family takes for fields a config.json leaves out (its token ids aside), so that a
    trimmed or hand-written config means the same model here as there."""

    model_type: str = ""
    defaults: dict[str, Any] = {}
    expert_keys = ExpertKeys("mlp.", "gate_proj", "up_proj", "down_proj")
    fused_experts = False  # one tensor per layer for all experts (fused_expert_key)

    def parse(self, f: Fields) -> ModelSpec:
        raise NotImplementedError

    # Checkpoint key names. `i` is the layer index, `e` the expert index.
    def layer_key(self, i: int, name: str) -> str:
        return f"model.layers.{i}.{name}"

    def attn_key(self, i: int, proj: str, suffix: str = "weight") -> str:
        return self.layer_key(i, f"self_attn.{proj}.{suffix}")

    def router_key(self, i: int, suffix: str = "weight") -> str:
        return self.layer_key(i, f"{self.expert_keys.moe_prefix}gate.{suffix}")

    def score_bias_key(self, i: int) -> str:
        return self.router_key(i, "e_score_correction_bias")

    def expert_key(self, i: int, e: int, part: str) -> str:
        k = self.expert_keys
        proj = {"gate": k.gate, "up": k.up, "down": k.down}[part]
        return self.layer_key(i, f"{k.moe_prefix}experts.{e}.{proj}.weight")

    def shared_key(self, i: int, part: str) -> str:
        return self.layer_key(i, f"{self.expert_keys.shared_prefix}{part}_proj.weight")

    def shared_gate_key(self, i: int) -> str:
        return self.layer_key(i, "mlp.shared_expert_gate.weight")

    def dense_key(self, i: int, part: str) -> str:
        return self.layer_key(i, f"mlp.{part}_proj.weight")

    def fused_expert_key(self, i: int, name: str) -> str:
        return self.layer_key(i, f"{self.expert_keys.moe_prefix}experts.{name}")


class Mixtral(Family):
    model_type = "mixtral"
    defaults = {"max_position_embeddings": 131072, "num_key_value_heads": 8,
                "rms_norm_eps": 1e-5}
    expert_keys = ExpertKeys("block_sparse_moe.", "w1", "w3", "w2")

    def parse(self, f: Fields) -> ModelSpec:
        _check_act(f)
        attn = _gqa(f)
        window = f.opt_integer("sliding_window")
        layers = f.integer("num_hidden_layers", required=True, minimum=1)
        moe = MoESpec(
            num_experts=f.integer(f.named("num_local_experts", "num_experts"), required=True),
            top_k=f.integer("num_experts_per_tok", 2),
            intermediate_size=f.integer("intermediate_size", required=True),
            router="topk_softmax")
        return ModelSpec(
            family=self.model_type, attention=attn, moe=moe,
            rope=_rope(f, attn.head_dim, 1e6, interleaved=False),
            layers=tuple(LayerSpec("moe", window) for _ in range(layers)),
            rms_norm_eps=f.number("rms_norm_eps", 1e-5), **_common(f))


def _sparse_layers(f: Fields, num_experts: int) -> list[str]:
    layers = f.integer("num_hidden_layers", required=True, minimum=1)
    step = f.integer("decoder_sparse_step", 1, minimum=1)
    dense_only = set(f.integers("mlp_only_layers"))
    return ["moe" if i not in dense_only and num_experts > 0 and (i + 1) % step == 0
            else "dense" for i in range(layers)]


class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    defaults = {"max_position_embeddings": 32768, "num_key_value_heads": 16,
                "rms_norm_eps": 1e-6, "shared_expert_intermediate_size": 5632,
                "max_window_layers": 28, "intermediate_size": 5632}
    expert_keys = ExpertKeys("mlp.", "gate_proj", "up_proj", "down_proj", "mlp.shared_expert.")

    def parse(self, f: Fields) -> ModelSpec:
        _check_act(f)
        attn = _gqa(f, qkv_bias=f.flag("qkv_bias", True))
        num_experts = f.integer(f.named("num_experts", "num_local_experts"), required=True,
                                minimum=1)
        kinds = _sparse_layers(f, num_experts)
        window = f.opt_integer("sliding_window") if f.flag("use_sliding_window", False) else None
        max_window_layers = f.integer("max_window_layers", len(kinds))
        layer_types = f.data.get("layer_types") or [
            "sliding_attention" if window and (i + 1) % 2 and i < max_window_layers
            else "full_attention" for i in range(len(kinds))]
        if len(layer_types) != len(kinds):
            raise f.error(f"field 'layer_types' has {len(layer_types)} entries for "
                          f"{len(kinds)} layers")
        moe = MoESpec(
            num_experts=num_experts, top_k=f.integer("num_experts_per_tok", 4),
            intermediate_size=f.integer("moe_intermediate_size", required=True),
            norm_topk_prob=f.flag("norm_topk_prob", False),
            shared_intermediate_size=f.integer("shared_expert_intermediate_size", 0, minimum=0),
            shared_gate=f.integer("shared_expert_intermediate_size", 0) > 0)
        return ModelSpec(
            family=self.model_type, attention=attn, moe=moe,
            rope=_rope(f, attn.head_dim, 10000.0, interleaved=False),
            layers=tuple(LayerSpec(k, window if t == "sliding_attention" else None)  # type: ignore[arg-type]
                         for k, t in zip(kinds, layer_types)),
            dense_intermediate_size=f.integer("intermediate_size", 0),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6), **_common(f))


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    defaults = {"max_position_embeddings": 32768, "num_key_value_heads": 4,
                "rms_norm_eps": 1e-6, "intermediate_size": 6144}

    def parse(self, f: Fields) -> ModelSpec:
        _check_act(f)
        bias = f.flag("attention_bias", False)
        attn = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head")
        num_experts = f.integer(f.named("num_experts", "num_local_experts"), required=True)
        kinds = _sparse_layers(f, num_experts)
        window = f.opt_integer("sliding_window") if f.flag("use_sliding_window", False) else None
        moe = MoESpec(
            num_experts=num_experts, top_k=f.integer("num_experts_per_tok", 8),
            intermediate_size=f.integer("moe_intermediate_size", required=True),
            norm_topk_prob=f.flag("norm_topk_prob", False))
        return ModelSpec(
            family=self.model_type, attention=attn, moe=moe,
            rope=_rope(f, attn.head_dim, 10000.0, interleaved=False),
            layers=tuple(LayerSpec(k, window) for k in kinds),  # type: ignore[arg-type]
            dense_intermediate_size=f.integer("intermediate_size", 0),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6), **_common(f))


class Olmoe(Family):
    model_type = "olmoe"
    defaults = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}

    def parse(self, f: Fields) -> ModelSpec:
        _check_act(f)
        bias = f.flag("attention_bias", False)
        clip = f.data.get("clip_qkv")
        attn = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="full",
                    clip_qkv=None if clip is None else f.number("clip_qkv"))
        hidden = f.integer("hidden_size", required=True)
        if attn.head_dim * attn.num_heads != hidden:
            raise f.error(f"OLMoE needs head_dim * num_attention_heads == hidden_size, got "
                          f"{attn.head_dim} * {attn.num_heads} != {hidden}")
        layers = f.integer("num_hidden_layers", required=True, minimum=1)
        moe = MoESpec(
            num_experts=f.integer(f.named("num_experts", "num_local_experts"), required=True),
            top_k=f.integer("num_experts_per_tok", 8),
            intermediate_size=f.integer("intermediate_size", required=True),
            norm_topk_prob=f.flag("norm_topk_prob", False))
        return ModelSpec(
            family=self.model_type, attention=attn, moe=moe,
            rope=_rope(f, attn.head_dim, 10000.0, interleaved=False),
            layers=tuple(LayerSpec("moe") for _ in range(layers)),
            rms_norm_eps=f.number("rms_norm_eps", 1e-5), **_common(f))


class DeepseekV2(Family):
    model_type = "deepseek_v2"
    defaults = {"max_position_embeddings": 2048, "n_shared_experts": 2, "q_lora_rank": 1536,
                "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "v_head_dim": 128, "rms_norm_eps": 1e-6, "intermediate_size": 11008}
    expert_keys = ExpertKeys("mlp.", "gate_proj", "up_proj", "down_proj", "mlp.shared_experts.")

    scoring = "softmax"
    topk_methods: tuple[str, ...] = ("greedy", "group_limited_greedy")
    rope_interleave_field = False  # always interleaved

    def parse(self, f: Fields) -> ModelSpec:
        _check_act(f)
        if f.flag("attention_bias", False) or f.flag("mlp_bias", False):
            raise f.error(f"attention_bias / mlp_bias are not supported for {self.model_type}")
        scoring = f.text("scoring_func", self.scoring)
        if scoring != self.scoring:
            raise f.error(f"field 'scoring_func' must be {self.scoring!r} for "
                          f"{self.model_type}, got {scoring!r}")
        heads = f.integer("num_attention_heads", required=True, minimum=1)
        nope = f.integer("qk_nope_head_dim", 128, minimum=0)
        rope_dim = f.integer("qk_rope_head_dim", 64, minimum=2)
        rope = _rope(f, rope_dim, 10000.0, interleaved=(
            f.flag("rope_interleave", True) if self.rope_interleave_field else True))
        scale = (nope + rope_dim) ** -0.5
        if rope.scaling == "yarn" and rope.mscale_all_dim:
            m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
            scale *= m * m
        attn = AttentionSpec(
            kind="mla", num_heads=heads, num_kv_heads=heads, head_dim=nope + rope_dim,
            q_lora_rank=f.opt_integer("q_lora_rank"),
            kv_lora_rank=f.integer("kv_lora_rank", 512, minimum=1),
            qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
            v_head_dim=f.integer("v_head_dim", 128, minimum=1), softmax_scale=scale)
        method = f.text("topk_method", self.topk_methods[0])
        if method not in self.topk_methods:
            raise f.error(f"field 'topk_method' must be one of {', '.join(self.topk_methods)} "
                          f"for {self.model_type}, got {method!r}")
        num_experts = f.integer(f.named("n_routed_experts", "num_local_experts"), required=True,
                                minimum=1)
        layers = f.integer("num_hidden_layers", required=True, minimum=1)
        first_dense = f.integer("first_k_dense_replace", 0, minimum=0)
        freq = f.integer("moe_layer_freq", 1, minimum=1)
        grouped = method in ("group_limited_greedy", "noaux_tc")
        router = {"greedy": "softmax_topk", "group_limited_greedy": "group_limited",
                  "noaux_tc": "noaux_tc"}[method]
        moe = MoESpec(
            num_experts=num_experts, top_k=f.integer("num_experts_per_tok", required=True),
            intermediate_size=f.integer("moe_intermediate_size", required=True),
            router=router,  # type: ignore[arg-type]
            norm_topk_prob=f.flag("norm_topk_prob", False),
            routed_scaling_factor=f.number("routed_scaling_factor", 1.0),
            num_groups=f.integer("n_group", 1) if grouped else 1,
            topk_groups=f.integer("topk_group", 1) if grouped else 1,
            router_fp32=True,
            shared_intermediate_size=(f.integer("moe_intermediate_size", required=True)
                                      * f.integer("n_shared_experts", 0, minimum=0)))
        kinds = ["moe" if i >= first_dense and i % freq == 0 else "dense" for i in range(layers)]
        return ModelSpec(
            family=self.model_type, attention=attn, moe=moe, rope=rope,
            layers=tuple(LayerSpec(k) for k in kinds),  # type: ignore[arg-type]
            dense_intermediate_size=f.integer("intermediate_size", 0),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6), **_common(f))


class DeepseekV3(DeepseekV2):
    """DeepSeek-V3 (and Kimi-K2, DeepSeek-R1): V2's MLA with sigmoid router scores, a
    per-expert correction bias for the choice, and groups ranked by their best two experts
    (`noaux_tc`). The multi-token-prediction layer after the last one is not used."""

    model_type = "deepseek_v3"
    defaults = {**DeepseekV2.defaults, "max_position_embeddings": 4096, "n_shared_experts": 1,
                "first_k_dense_replace": 3, "norm_topk_prob": True,
                "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
                "intermediate_size": 18432}
    scoring = "sigmoid"
    topk_methods = ("noaux_tc",)
    rope_interleave_field = True  # V3 honours rope_interleave (transformers' V2 does not)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class GptOss(Family):
    """GPT-OSS: attention with q/k/v/o biases and a learned sink logit per head, sliding-
    window layers alternating with full ones (`layer_types`), a biased router (top-k of the
    logits, softmax over those k), experts with biases and a clamped SwiGLU, stored fused:
    gate_up_proj [E, D, 2F] with gate and up interleaved in the last dim, down_proj
    [E, F, D]. YaRN rope over halves."""

    model_type = "gpt_oss"
    defaults = {"max_position_embeddings": 131072, "num_key_value_heads": 8, "head_dim": 64,
                "sliding_window": 128, "rms_norm_eps": 1e-5}
    fused_experts = True

    def router_key(self, i: int, suffix: str = "weight") -> str:
        return self.layer_key(i, f"mlp.router.{suffix}")

    def parse(self, f: Fields) -> ModelSpec:
        bias = f.flag("attention_bias", True)
        attn = replace(_gqa(f, qkv_bias=bias, o_bias=bias), sinks=True)
        num_layers = f.integer("num_hidden_layers", required=True, minimum=1)
        window = f.opt_integer("sliding_window")
        layer_types = f.data.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        if (not isinstance(layer_types, list) or len(layer_types) != num_layers or any(
                t not in ("sliding_attention", "full_attention") for t in layer_types)):
            raise f.error(f"field 'layer_types' must list sliding_attention or full_attention "
                          f"for each of the {num_layers} layers, got {layer_types!r}")
        moe = MoESpec(
            num_experts=f.integer(f.named("num_local_experts", "num_experts"), required=True),
            top_k=f.integer(f.named("num_experts_per_tok", "experts_per_token"), 4),
            intermediate_size=f.integer("intermediate_size", required=True),
            router="topk_softmax", router_bias=True, expert_bias=True,
            swiglu_limit=f.number("swiglu_limit", 7.0),
            swiglu_alpha=f.number("swiglu_alpha", 1.702))
        if not f.data.get("rope_scaling") and not f.data.get("rope_parameters"):
            f = Fields({**f.data, "rope_scaling": {  # transformers' default for gpt_oss
                "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}}, f.source)
        return ModelSpec(
            family=self.model_type, attention=attn, moe=moe,
            rope=_rope(f, attn.head_dim, 150000.0, interleaved=False),
            layers=tuple(LayerSpec("moe", window if t == "sliding_attention" else None)
                         for t in layer_types),
            rms_norm_eps=f.number("rms_norm_eps", 1e-5), **_common(f))


FAMILIES: dict[str, Family] = {
    fam.model_type: fam for fam in (Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(), DeepseekV2(),
                                    DeepseekV3(), GptOss())}


# model types that are another family's architecture under their own name: Kimi-K2's
# config says kimi_k2 (its architectures: DeepseekV3ForCausalLM)
ALIASES = {"kimi_k2": "deepseek_v3"}

# (model_type, quant_method) pairs the loader reads: GPT-OSS's MXFP4 experts are
# dequantized at load time (moeflow.models.weights, moeflow.models.mxfp4)
QUANTIZATIONS = frozenset({("gpt_oss", "mxfp4")})


def family_of(spec_or_type: ModelSpec | str) -> Family:
    name = spec_or_type if isinstance(spec_or_type, str) else spec_or_type.family
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; supported: "
                          f"{', '.join(sorted(FAMILIES))}") from None


def spec_from_config(config: dict[str, Any], source: str = CONFIG_FILE) -> ModelSpec:
    """A ModelSpec from a parsed config dict; `source` names it in errors."""
    f = Fields(config, source)
    model_type = ALIASES.get(config.get("model_type"), config.get("model_type"))  # type: ignore[arg-type]
    if model_type not in FAMILIES:
        raise f.error(f"unknown model family {model_type!r}; supported: "
                      f"{', '.join(sorted(FAMILIES))}")
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else None) or "unknown"
        if (model_type, method) not in QUANTIZATIONS:
            raise f.error(f"the checkpoint is quantized with {method!r}, which moeflow does "
                          f"not load for {model_type}; it loads float32, bfloat16 and float16 "
                          f"weights, and gpt_oss's mxfp4 experts")
    try:
        family = FAMILIES[model_type]
        spec = family.parse(Fields({**family.defaults, **config}, source))
    except SpecError as exc:
        raise f.error(str(exc)) from None
    return spec


def load_spec(model_dir: str | Path) -> ModelSpec:
    """The ModelSpec of a checkpoint directory: config.json, with generation_config.json's
    eos ids when it has any (generation follows that file, as in transformers). A config
    that names no dtype takes its stored weights' (transformers' "auto" does the same)."""
    directory = Path(model_dir)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    if config.get("dtype") is None and config.get("torch_dtype") is None:
        stored = _stored_dtype(directory)
        if stored is not None:
            config = {**config, "torch_dtype": stored}
    gen_path = directory / GENERATION_CONFIG_FILE
    generation = _read_json(gen_path) if gen_path.exists() else None
    eos = None
    if isinstance(generation, dict) and generation.get("eos_token_id") is not None:
        # what generation uses (it may list several): config.json's are not read then
        eos = Fields(generation, str(gen_path)).token_ids("eos_token_id")
        config = {**config, "eos_token_id": None}
    spec = replace(spec_from_config(config, str(path)), name=directory.name)
    if eos is not None:
        try:
            spec = replace(spec, eos_token_ids=eos)
        except SpecError as exc:
            raise ConfigError(f"{gen_path}: {exc}") from None
    return spec


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:  # a directory, unreadable
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


# safetensors' names of the dtypes a checkpoint's weights may be stored in
_STORED = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _stored_dtype(directory: Path) -> str | None:
    """The dtype the token embedding is stored in (None when that cannot be read here; the
    loader says why later), read from a safetensors header alone."""
    name = "model.embed_tokens.weight"
    try:
        index = directory / "model.safetensors.index.json"
        filename = (json.loads(index.read_text())["weight_map"][name] if index.exists()
                    else "model.safetensors")
        with open(directory / str(filename), "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(min(size, 100 << 20)))
        return _STORED.get(header[name]["dtype"])
    except Exception:  # noqa: BLE001 - any unreadable file: the loader reports it
        return None
