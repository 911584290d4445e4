"""Tiny random checkpoints in the real Hugging Face layout, for tests, demos and benchmarks.

`make_tiny(family, out_dir, ...)` writes what a hub download would hold:
    config.json                 the family's own fields, as published checkpoints spell them
    model.safetensors           per-expert keys (or shards plus model.safetensors.index.json)
    generation_config.json
    tokenizer.json              byte-level BPE trained here on a small bundled corpus
    tokenizer_config.json       its special tokens and a ChatML-style chat template

Weights are drawn from a seeded generator, so the same arguments give the same bytes.
Their scale (about 1/sqrt(fan_in)) keeps activations and logits O(1), so greedy decoding
has clear winners.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moeflow.models.checkpoint import INDEX_FILE, SINGLE_FILE
from moeflow.models.families import FAMILIES, family_of, spec_from_config
from moeflow.models.spec import ModelSpec
from moeflow.models.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, train_tokenizer
from moeflow.models.weights import torch_dtype

# a byte-level BPE tokenizer holds every byte and the special tokens at least
TOKENIZER_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# ChatML-style, as many MoE checkpoints use; the markers are plain text to the tiny tokenizer
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CORPUS_FILE = Path(__file__).with_name("corpus.txt")


@dataclass(frozen=True, slots=True)
class TinyShape:
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 32  # routed expert FFN width
    dense_intermediate: int = 96
    shared_intermediate: int = 48
    vocab: int = 512
    max_positions: int = 2048


def tiny_config(family: str, shape: TinyShape = TinyShape(), dtype: str = "float32",
                **overrides: Any) -> dict[str, Any]:
    """config.json for a tiny `family` checkpoint, spelled as that family's hub configs are."""
    family_of(family)
    s = shape
    base: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]], "model_type": family,
        "vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": s.max_positions,
        "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": dtype,
        "use_cache": True, "bos_token_id": None, "eos_token_id": 0, "attention_dropout": 0.0,
    }
    if family == "mixtral":
        base.update(intermediate_size=s.intermediate, head_dim=s.head_dim,
                    num_local_experts=s.experts, num_experts_per_tok=s.top_k,
                    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                    router_aux_loss_coef=0.02, output_router_logits=False)
    elif family == "qwen2_moe":
        base.update(intermediate_size=s.dense_intermediate, moe_intermediate_size=s.intermediate,
                    shared_expert_intermediate_size=s.shared_intermediate,
                    num_experts=s.experts, num_experts_per_tok=s.top_k, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                    rope_theta=1e6, use_sliding_window=False, sliding_window=None,
                    max_window_layers=s.layers)
        base["num_attention_heads"] = s.hidden // s.head_dim
    elif family == "qwen3_moe":
        base.update(intermediate_size=s.dense_intermediate, moe_intermediate_size=s.intermediate,
                    head_dim=s.head_dim, num_experts=s.experts, num_experts_per_tok=s.top_k,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                    attention_bias=False, rms_norm_eps=1e-6, rope_theta=1e6,
                    use_sliding_window=False, sliding_window=None)
    elif family == "olmoe":
        base.update(intermediate_size=s.intermediate, num_experts=s.experts,
                    num_experts_per_tok=s.top_k, norm_topk_prob=False, clip_qkv=None,
                    attention_bias=False, rms_norm_eps=1e-5, rope_theta=10000.0)
        base["num_attention_heads"] = s.hidden // s.head_dim
    elif family == "deepseek_v2":
        groups = 4 if s.experts % 4 == 0 else 1
        base.update(intermediate_size=s.dense_intermediate, moe_intermediate_size=s.intermediate,
                    n_routed_experts=s.experts, n_shared_experts=1, num_experts_per_tok=s.top_k,
                    first_k_dense_replace=1, moe_layer_freq=1,
                    topk_method="group_limited_greedy" if groups > 1 else "greedy",
                    n_group=groups, topk_group=max(1, groups // 2), routed_scaling_factor=1.5,
                    norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001,
                    q_lora_rank=s.hidden // 2, kv_lora_rank=s.hidden // 2,
                    qk_nope_head_dim=s.head_dim, qk_rope_head_dim=s.head_dim // 2,
                    v_head_dim=s.head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
                    rope_scaling={"type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": s.max_positions // 4,
                                  "mscale": 0.707, "mscale_all_dim": 0.707,
                                  "beta_fast": 32, "beta_slow": 1},
                    attention_bias=False, mlp_bias=False)
        base["num_key_value_heads"] = s.heads
    elif family == "deepseek_v3":
        groups = 4 if s.experts % 8 == 0 else 1
        base.update(intermediate_size=s.dense_intermediate, moe_intermediate_size=s.intermediate,
                    n_routed_experts=s.experts, n_shared_experts=1, num_experts_per_tok=s.top_k,
                    first_k_dense_replace=1, topk_method="noaux_tc", n_group=groups,
                    topk_group=max(1, groups // 2), routed_scaling_factor=2.5,
                    norm_topk_prob=True, scoring_func="sigmoid",
                    q_lora_rank=s.hidden // 2, kv_lora_rank=s.hidden // 2,
                    qk_nope_head_dim=s.head_dim, qk_rope_head_dim=s.head_dim // 2,
                    v_head_dim=s.head_dim, rms_norm_eps=1e-6, rope_interleave=True,
                    rope_scaling={"type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": s.max_positions // 4,
                                  "mscale": 1.0, "mscale_all_dim": 1.0,
                                  "beta_fast": 32, "beta_slow": 1},
                    rope_theta=10000.0, attention_bias=False)
        base["num_key_value_heads"] = s.heads
    elif family == "gpt_oss":
        base.update(intermediate_size=s.intermediate, head_dim=s.head_dim,
                    num_local_experts=s.experts, num_experts_per_tok=s.top_k,
                    rms_norm_eps=1e-5, attention_bias=True, sliding_window=4,
                    layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                                 for i in range(s.layers)],
                    # a low limit, so that the clamps of the SwiGLU are exercised
                    swiglu_limit=1.5, rope_theta=150000.0,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                  "beta_slow": 1.0, "truncate": False,
                                  "original_max_position_embeddings": s.max_positions // 4},
                    router_aux_loss_coef=0.9, output_router_logits=False)
    base.update(overrides)
    return base


_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def random_state(spec: ModelSpec, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint of `spec`, by hub key name, deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    fam = family_of(spec)
    a, d, moe = spec.attention, spec.hidden_size, spec.moe
    out: dict[str, torch.Tensor] = {}

    def mat(key: str, rows: int, cols: int) -> None:
        out[key] = (torch.randn(rows, cols, generator=gen) / math.sqrt(cols)).to(dtype)

    def vec(key: str, n: int, around: float = 1.0, spread: float = 0.1) -> None:
        out[key] = (around + spread * torch.randn(n, generator=gen)).to(dtype)

    out["model.embed_tokens.weight"] = torch.randn(spec.vocab_size, d, generator=gen).to(dtype)
    for i, layer in enumerate(spec.layers):
        vec(fam.layer_key(i, "input_layernorm.weight"), d)
        vec(fam.layer_key(i, "post_attention_layernorm.weight"), d)
        key = fam.attn_key
        if a.kind == "mla":
            qk = a.num_heads * a.head_dim
            if a.q_lora_rank:
                mat(key(i, "q_a_proj"), a.q_lora_rank, d)
                vec(key(i, "q_a_layernorm"), a.q_lora_rank)
                mat(key(i, "q_b_proj"), qk, a.q_lora_rank)
            else:
                mat(key(i, "q_proj"), qk, d)
            mat(key(i, "kv_a_proj_with_mqa"), a.kv_lora_rank + a.qk_rope_head_dim, d)
            vec(key(i, "kv_a_layernorm"), a.kv_lora_rank)
            mat(key(i, "kv_b_proj"), a.num_heads * (a.qk_nope_head_dim + a.v_head_dim),
                a.kv_lora_rank)
        else:
            for proj, rows in (("q_proj", a.q_width), ("k_proj", a.kv_width),
                               ("v_proj", a.kv_width)):
                mat(key(i, proj), rows, d)
                if a.qkv_bias:
                    vec(key(i, proj, "bias"), rows, 0.0, 0.5)
            if a.qk_norm != "none":
                vec(key(i, "q_norm"), a.head_dim if a.qk_norm == "head" else a.q_width)
                vec(key(i, "k_norm"), a.head_dim if a.qk_norm == "head" else a.kv_width)
        mat(key(i, "o_proj"), d, a.o_width)
        if a.o_bias:
            vec(key(i, "o_proj", "bias"), d, 0.0, 0.5)
        if a.sinks:
            vec(fam.layer_key(i, "self_attn.sinks"), a.num_heads, 0.0, 1.0)
        if layer.mlp == "dense":
            f = spec.dense_intermediate_size
            mat(fam.dense_key(i, "gate"), f, d)
            mat(fam.dense_key(i, "up"), f, d)
            mat(fam.dense_key(i, "down"), d, f)
            continue
        # router rows spread wide, so that each token has clear top-k experts
        out[fam.router_key(i)] = (2.0 * torch.randn(moe.num_experts, d, generator=gen)
                                  / math.sqrt(d)).to(dtype)
        if moe.router == "noaux_tc":  # kept fp32, as the hub's checkpoints keep it
            vec(fam.score_bias_key(i), moe.num_experts, 0.0, 0.1)
            out[fam.score_bias_key(i)] = out[fam.score_bias_key(i)].float()
        if moe.router_bias:
            vec(fam.router_key(i, "bias"), moe.num_experts, 0.0, 0.5)
        f, n = moe.intermediate_size, moe.num_experts
        if fam.fused_experts:  # [E, D, 2F] gate/up interleaved, [E, F, D]
            key_of = fam.fused_expert_key
            out[key_of(i, "gate_up_proj")] = (torch.randn(n, d, 2 * f, generator=gen)
                                              / math.sqrt(d)).to(dtype)
            out[key_of(i, "down_proj")] = (torch.randn(n, f, d, generator=gen)
                                           / math.sqrt(f)).to(dtype)
            if moe.expert_bias:
                out[key_of(i, "gate_up_proj_bias")] = (
                    0.5 * torch.randn(n, 2 * f, generator=gen)).to(dtype)
                out[key_of(i, "down_proj_bias")] = (
                    0.5 * torch.randn(n, d, generator=gen)).to(dtype)
        for e in range(n if not fam.fused_experts else 0):
            mat(fam.expert_key(i, e, "gate"), f, d)
            mat(fam.expert_key(i, e, "up"), f, d)
            mat(fam.expert_key(i, e, "down"), d, f)
        if moe.shared_intermediate_size:
            fs = moe.shared_intermediate_size
            mat(fam.shared_key(i, "gate"), fs, d)
            mat(fam.shared_key(i, "up"), fs, d)
            mat(fam.shared_key(i, "down"), d, fs)
            if moe.shared_gate:
                mat(fam.shared_gate_key(i), 1, d)
    vec("model.norm.weight", d)
    if not spec.tie_word_embeddings:
        mat("lm_head.weight", spec.vocab_size, d)
    return out


def _mxfp4_experts(spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused expert weights of `state` replaced by their MXFP4 blocks and scales."""
    from moeflow.models.mxfp4 import quantize_experts

    fam = family_of(spec)
    for i, layer in enumerate(spec.layers):
        if layer.mlp != "moe":
            continue
        for name in ("gate_up_proj", "down_proj"):
            key = fam.fused_expert_key(i, name)
            blocks, scales = quantize_experts(state.pop(key).float())
            state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
    return state


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' file, readable as the checkpoint's other files are (it creates its own
    0600, which another user, or a container's, cannot load)."""
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it where Linux tells it (setting it, even
    for an instant, changes it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_safetensors(state: dict[str, torch.Tensor], out_dir: Path, shards: int = 1) -> None:
    """Write `state` as model.safetensors, or as `shards` files plus the index."""
    names = list(state)
    if shards <= 1:
        _save(state, out_dir / SINGLE_FILE)
        return
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[s * per:(s + 1) * per]}
        _save(part, out_dir / filename)
        weight_map.update({n: filename for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out_dir / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_tiny(family: str, out_dir: str | Path, shape: TinyShape = TinyShape(), *,
              seed: int = 0, dtype: str = "float32", shards: int = 1, tokenizer: bool = True,
              mxfp4: bool = False, **config_overrides: Any) -> Path:
    """Write a random `family` checkpoint to `out_dir` (created if needed). `mxfp4`
    (gpt_oss only): store the experts MXFP4-packed, as the hub's gpt-oss checkpoints do."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    if mxfp4 and family != "gpt_oss":
        raise ValueError(f"MXFP4 experts are gpt_oss's format, not {family}'s")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if tokenizer and shape.vocab < TOKENIZER_MIN_VOCAB:  # its byte alphabet and specials
        raise ValueError(f"a vocabulary of {shape.vocab} is smaller than the tokenizer's "
                         f"{TOKENIZER_MIN_VOCAB} tokens (256 bytes and "
                         f"{len(SPECIAL_TOKENS)} special tokens): give --vocab >= "
                         f"{TOKENIZER_MIN_VOCAB}, or --no-tokenizer for token ids only")
    config = tiny_config(family, shape, dtype, **config_overrides)
    spec = spec_from_config(config, str(out / "config.json"))  # a bad shape leaves no
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # directory behind
    try:
        _write(out, family, config, spec, shape, seed, dtype, shards, tokenizer, mxfp4)
    except BaseException:  # a shape MXFP4 cannot pack, Ctrl-C: no half checkpoint left
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _write(out: Path, family: str, config: dict[str, Any], spec: Any, shape: TinyShape,
           seed: int, dtype: str, shards: int, tokenizer: bool, mxfp4: bool) -> None:
    state = random_state(spec, seed, torch_dtype(dtype))
    if mxfp4:
        state = _mxfp4_experts(spec, state)
        config["quantization_config"] = {
            "quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                "lm_head"]}
    write_safetensors(state, out, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": config["eos_token_id"], "bos_token_id": config["bos_token_id"],
         "do_sample": False}, indent=2) + "\n")
    if tokenizer:
        tok = train_tokenizer(CORPUS_FILE.read_text().splitlines(), shape.vocab)
        tok.save(str(out / TOKENIZER_FILE))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[1],
             "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
