"""moeflow against transformers on the same checkpoints: fp32 logits of the prefill and of
every decode step within 1e-4, identical greedy tokens, whatever the expert placement."""

from __future__ import annotations

import pytest
import torch

from moeflow.serve.llm import LLM

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss")
PROMPT = [5, 17, 33, 2, 99, 250, 7, 8, 9, 10, 11, 300, 301]
DECODE_STEPS = 10
ATOL = 1e-4


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy_steps(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill (all positions) and of each greedy decode step."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits = [out.logits[0].float()]
    past, tokens = out.past_key_values, []
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1:].float())
    return logits, tokens


def moeflow_greedy_steps(runner, prompt: list[int], steps: int):
    logits = [runner.forward({0: prompt}, logits="all")[0]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(runner.forward({0: [tokens[-1]]})[0])
    return logits, tokens


@pytest.fixture(scope="module")
def checkpoints(tiny_factory):
    return {f: tiny_factory(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def references(checkpoints):
    return {f: hf_greedy_steps(hf_model(checkpoints[f]), PROMPT, DECODE_STEPS)
            for f in FAMILIES}


@pytest.mark.parametrize("devices", ["cpu:0", "cpu:0,cpu:1", "cpu:0,cpu:1,cpu:2,cpu:3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match(family, devices, checkpoints, references, step_runner):
    ref_logits, ref_tokens = references[family]
    runner = step_runner(LLM(checkpoints[family], devices=devices, dtype="float32"))
    logits, tokens = moeflow_greedy_steps(runner, PROMPT, DECODE_STEPS)
    assert tokens == ref_tokens
    assert len(logits) == DECODE_STEPS + 1
    for step, (ours, theirs) in enumerate(zip(logits, ref_logits)):
        assert ours.shape == theirs.shape, step
        diff = (ours - theirs).abs().max().item()
        assert diff <= ATOL, f"step {step}: max |Δlogit| = {diff:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_api_gives_transformers_greedy_tokens(family, checkpoints, references):
    _, ref_tokens = references[family]
    llm = LLM(checkpoints[family], devices="cpu:0,cpu:1")
    [out] = llm.generate(PROMPT, max_new_tokens=DECODE_STEPS, sampling=None)
    # generation stops early only at the checkpoint's eos token
    assert list(out.token_ids) == ref_tokens[:len(out.token_ids)]
    assert out.finish_reason == "length" or out.token_ids[-1] in llm.spec.eos_token_ids


def test_batched_sequences_of_different_lengths_match_alone(checkpoints, step_runner):
    """Prefill three prompts in one unit, then decode them together: each sequence's logits
    equal those of running it alone in transformers."""
    family = "qwen3_moe"
    model = hf_model(checkpoints[family])
    prompts = {0: PROMPT, 1: PROMPT[:4], 2: [400, 401, 402, 403, 404, 405, 406]}
    refs = {s: hf_greedy_steps(model, p, 4) for s, p in prompts.items()}
    runner = step_runner(LLM(checkpoints[family], devices="cpu:0,cpu:1", dtype="float32"))
    first = runner.forward(prompts, logits="all")
    for s in prompts:
        assert (first[s] - refs[s][0][0]).abs().max() <= ATOL
    for step in range(4):
        out = runner.forward({s: [refs[s][1][step]] for s in prompts})
        for s in prompts:
            assert (out[s] - refs[s][0][step + 1]).abs().max() <= ATOL, (s, step)


def test_chunked_prefill_matches_whole_prefill(checkpoints, step_runner):
    family = "deepseek_v2"
    model = hf_model(checkpoints[family])
    ref_logits, _ = hf_greedy_steps(model, PROMPT, 0)
    runner = step_runner(LLM(checkpoints[family], devices="cpu:0,cpu:1", dtype="float32"))
    parts = [PROMPT[:5], PROMPT[5:6], PROMPT[6:]]
    got = [runner.forward({0: part}, logits="all")[0] for part in parts]
    assert (torch.cat(got) - ref_logits[0]).abs().max() <= ATOL


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {"sliding_window": 5}),
    ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1], "decoder_sparse_step": 1}),
    ("qwen3_moe", {"norm_topk_prob": False, "attention_bias": True}),
    ("olmoe", {"clip_qkv": 0.5, "norm_topk_prob": True}),
    ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1,
                     "topk_group": 1, "rope_scaling": None, "first_k_dense_replace": 0}),
    ("deepseek_v3", {"rope_interleave": False}),
])
def test_config_variants_match(family, overrides, tiny_factory, step_runner):
    path = tiny_factory(family, **overrides)
    ref_logits, ref_tokens = hf_greedy_steps(hf_model(path), PROMPT, 8)
    runner = step_runner(LLM(path, devices="cpu:0,cpu:1", dtype="float32"))
    logits, tokens = moeflow_greedy_steps(runner, PROMPT, 8)
    assert tokens == ref_tokens
    for step, (ours, theirs) in enumerate(zip(logits, ref_logits)):
        assert (ours - theirs).abs().max() <= ATOL, step


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_matches_transformers_in_bfloat16(family, tiny_factory, step_runner):
    """bf16 checkpoints run in bf16 by default (dtype='auto') and agree with transformers'
    own bf16 forward far more closely than bf16 agrees with fp32."""
    transformers = pytest.importorskip("transformers")
    path = tiny_factory(family, dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0].float()
    llm = LLM(path, devices="cpu:0,cpu:1")
    assert llm.dtype == torch.bfloat16
    ours = step_runner(llm).forward({0: PROMPT}, logits="all")[0]
    assert (ours - ref).abs().max() <= 0.05
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


SAVED_BY_TRANSFORMERS = {
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=4, eos_token_id=1, pad_token_id=0),
    "deepseek_v2": dict(n_routed_experts=4, moe_intermediate_size=32, kv_lora_rank=32,
                        q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_shared_experts=1, first_k_dense_replace=1,
                        num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=32, kv_lora_rank=32,
                        q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=4, topk_group=2, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=4, head_dim=16, sliding_window=4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_transformers_saves_load_and_match(family, tmp_path, step_runner):
    """A config as transformers writes it (dtype, rope_parameters, and whichever name it
    gives the expert count: qwen3_moe's is num_local_experts) loads, and the model saved
    with it gives transformers' logits."""
    transformers = pytest.importorskip("transformers")
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 num_experts_per_tok=2)
    config = transformers.AutoConfig.for_model(family, **{**shape,
                                                          **SAVED_BY_TRANSFORMERS[family]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # shards, as large checkpoints come
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ref_logits, ref_tokens = hf_greedy_steps(model, PROMPT, 8)
    runner = step_runner(LLM(tmp_path, devices="cpu:0,cpu:1", dtype="float32"))
    logits, tokens = moeflow_greedy_steps(runner, PROMPT, 8)
    assert tokens == ref_tokens
    for step, (ours, theirs) in enumerate(zip(logits, ref_logits)):
        assert (ours - theirs).abs().max() <= ATOL, step


def test_mxfp4_experts_match_transformers_own_dequantization(tiny_factory, step_runner):
    """A gpt_oss checkpoint whose experts are MXFP4-packed as the hub's are: transformers
    dequantizes it its own way, moeflow its own, and the logits agree."""
    pytest.importorskip("accelerate")  # transformers' mxfp4 loader needs it
    path = tiny_factory("gpt_oss", mxfp4=True)
    assert any(k.endswith("gate_up_proj_blocks") for k in _tensor_names(path))
    ref_logits, ref_tokens = hf_greedy_steps(hf_model(path), PROMPT, 8)
    for devices in ("cpu:0", "cpu:0,cpu:1"):
        runner = step_runner(LLM(path, devices=devices, dtype="float32"))
        logits, tokens = moeflow_greedy_steps(runner, PROMPT, 8)
        assert tokens == ref_tokens
        for step, (ours, theirs) in enumerate(zip(logits, ref_logits)):
            assert (ours - theirs).abs().max() <= ATOL, (devices, step)


def _tensor_names(path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names += list(f.keys())
    return names
