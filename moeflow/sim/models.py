"""Model presets for simulation: published MoE models from their config shapes alone.

The families moeflow loads are written as the `config.json` their hub checkpoints
publish, parsed by the same family adapters as a real checkpoint. DBRX, which moeflow does
not load, is described directly as a ModelSpec.

    moeflow.sim.models.load("mixtral-8x7b")       # a preset
    moeflow.sim.models.load("path/to/checkpoint")  # any config.json directory
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeflow.models.families import load_spec, spec_from_config
from moeflow.models.spec import AttentionSpec, LayerSpec, ModelSpec, MoESpec, RopeSpec

_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2},
    "mixtral-8x22b": {
        "model_type": "mixtral", "vocab_size": 32768, "hidden_size": 6144,
        "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 65536, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2},
    "deepseek-v2": {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120,
        "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 160,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "topk_method": "group_limited_greedy", "n_group": 8,
        "topk_group": 3, "routed_scaling_factor": 16.0, "norm_topk_prob": False,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
        "rope_theta": 10000, "rope_scaling": {
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "bos_token_id": 100000,
        "eos_token_id": 100001},
    "deepseek-v3": {  # also Kimi-K2's and DeepSeek-R1's shape (K2: 384 experts, 64 heads)
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "moe_layer_freq": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
        "rope_theta": 10000, "rope_scaling": {
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "bos_token_id": 0,
        "eos_token_id": 1},
    # GPT-OSS: the hub stores the experts in MXFP4; these presets simulate bf16 weights
    "gpt-oss-120b": {
        "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
        "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128,
        "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True,
        "max_position_embeddings": 131072, "rope_theta": 150000.0, "rope_scaling": {
            "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096},
        "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "eos_token_id": 200002},
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645},
    "olmoe-1b-7b": {
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "eos_token_id": 50279},
}


# gpt-oss-20b: 120b's shape with 24 layers of 32 experts
_CONFIGS["gpt-oss-20b"] = {**_CONFIGS["gpt-oss-120b"], "num_hidden_layers": 24,
                           "num_local_experts": 32}


def _dbrx() -> ModelSpec:
    """DBRX (132B total, 36B active): 16 experts, top-4, GQA with clipped q/k/v."""
    attention = AttentionSpec("gqa", num_heads=48, num_kv_heads=8, head_dim=128, clip_qkv=8.0)
    return ModelSpec(
        family="dbrx", vocab_size=100352, hidden_size=6144, attention=attention,
        rope=RopeSpec(theta=500000.0, rotary_dim=128),
        moe=MoESpec(num_experts=16, top_k=4, intermediate_size=10752, norm_topk_prob=True),
        layers=tuple(LayerSpec("moe") for _ in range(40)), rms_norm_eps=1e-5,
        max_position_embeddings=32768, dtype="bfloat16", eos_token_ids=(100257,),
        name="dbrx")


def names() -> list[str]:
    return sorted([*_CONFIGS, "dbrx"])


def load(name_or_path: str) -> ModelSpec:
    """A preset by name, or the config.json of a checkpoint directory."""
    if name_or_path == "dbrx":
        return _dbrx()
    if name_or_path in _CONFIGS:
        spec = spec_from_config(dict(_CONFIGS[name_or_path]), f"preset {name_or_path}")
        return _renamed(spec, name_or_path)
    if Path(name_or_path).is_dir():
        return load_spec(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}; presets: {', '.join(names())}, or a "
                     f"checkpoint directory")


def _renamed(spec: ModelSpec, name: str) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, name=name)
