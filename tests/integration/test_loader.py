"""Loading checkpoints: sharded and single-file agree, weights are mapped not copied, and each
kind of bad input fails with a message that names the file and the key or field."""

from __future__ import annotations

import gc
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeflow.cli import main as cli_main
from moeflow.models.checkpoint import Checkpoint, CheckpointError
from moeflow.models.families import FAMILIES, ConfigError, load_spec, spec_from_config
from moeflow.models.tiny import make_tiny
from moeflow.models import weights
from moeflow.models.weights import WeightLoader
from moeflow.serve.llm import LLM, NoTokenizerError

EXPERT_KEY = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture
def ckpt(tmp_path: Path, tiny_factory) -> Path:
    """A private copy of a tiny qwen3_moe checkpoint that a test may damage."""
    out = tmp_path / "model"
    shutil.copytree(tiny_factory("qwen3_moe"), out)
    return out


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_factory):
    single = tiny_factory("mixtral")
    sharded = make_tiny("mixtral", tmp_path / "sharded", shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = Checkpoint(single), Checkpoint(sharded)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    prompt = [3, 4, 5, 6]
    assert (LLM(single).generate(prompt, max_new_tokens=4)[0].token_ids
            == LLM(sharded).generate(prompt, max_new_tokens=4)[0].token_ids)


def test_weights_view_the_mapped_file_without_copying(tiny_factory):
    path = tiny_factory("qwen3_moe")
    ckpt = Checkpoint(path)
    dense = WeightLoader(load_spec(path), ckpt, torch.float32).dense()
    # tensors used as stored are views of the one mapping, not copies
    for key, tensor in (("model.embed_tokens.weight", dense.embed),
                        ("lm_head.weight", dense.lm_head),
                        ("model.layers.0.self_attn.o_proj.weight", dense.layers[0].attn.o)):
        assert tensor.data_ptr() == ckpt.get(key).data_ptr(), key
    # a fused q/k/v matrix is the one copy those bytes get
    assert dense.layers[0].attn.qkv.data_ptr() != ckpt.get(
        "model.layers.0.self_attn.q_proj.weight").data_ptr()


def test_streamed_weights_sit_on_memory_advised_for_huge_pages(monkeypatch, tiny_factory,
                                                               vm_flags):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    monkeypatch.setattr(weights, "HUGE_MIN", 1)  # the tiny model's weights count as large

    ckpt = Checkpoint(path)

    def load(huge: bool):
        monkeypatch.setenv("MOEFLOW_HUGE_PAGES", "on" if huge else "off")
        loader = WeightLoader(spec, ckpt, torch.float32)
        dense, stack = loader.dense(), loader.experts(1, (0, 1, 2))
        attn = dense.layers[0].attn
        return {"qkv": attn.qkv, "o": attn.o, "lm_head": dense.lm_head,
                "gate_up": stack.gate_up, "down": stack.down, "embed": dense.embed}

    huge, plain = load(True), load(False)
    for name, t in huge.items():
        assert torch.equal(t, plain[name]), name
        assert ("hg" in vm_flags(t.data_ptr())) == (name != "embed"), name  # a gather: as is
        assert "hg" not in vm_flags(plain[name].data_ptr()), name
    # the o projection and the LM head leave the checkpoint's mapping only for huge pages
    for name, key in (("o", "model.layers.0.self_attn.o_proj.weight"),
                      ("lm_head", "lm_head.weight"), ("embed", "model.embed_tokens.weight")):
        assert plain[name].data_ptr() == ckpt.get(key).data_ptr(), name
    address = huge["gate_up"].data_ptr()
    del huge, t
    gc.collect()
    assert vm_flags(address) is None or "hg" not in vm_flags(address)  # unmapped when freed


def test_unknown_family(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(ConfigError, match=r"config\.json: unknown model family 'llama'"):
        load_spec(ckpt)


def test_unknown_family_lists_the_supported_ones(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(ConfigError, match=r"supported: deepseek_v2, deepseek_v3, gpt_oss, "
                                          r"mixtral, olmoe, qwen2_moe, qwen3_moe"):
        load_spec(ckpt)


def test_a_quantized_checkpoint_is_refused_by_its_method(ckpt):
    edit_config(ckpt, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ConfigError, match=r"config\.json: the checkpoint is quantized with "
                                          r"'gptq', which moeflow does not load"):
        load_spec(ckpt)


def test_several_eos_ids_come_from_generation_config(ckpt):
    path = ckpt / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [0, 1, 2]}))
    assert load_spec(ckpt).eos_token_ids == (0, 1, 2)


def test_a_bad_eos_id_in_generation_config_is_named_there(ckpt):
    path = ckpt / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [1, 10**6]}))
    with pytest.raises(ConfigError, match=r"generation_config\.json: eos_token_id 1000000 "
                                          r"outside the vocabulary"):
        load_spec(ckpt)


def test_a_config_without_a_dtype_takes_the_stored_weights(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype")
    edit_config(ckpt, dtype=None, torch_dtype=None)
    assert load_spec(ckpt).dtype == stored == "float32"


def test_kimi_k2_reads_as_deepseek_v3(tiny_factory):
    config = json.loads((tiny_factory("deepseek_v3") / "config.json").read_text())
    kimi = spec_from_config({**config, "model_type": "kimi_k2"})
    assert kimi == spec_from_config(config) and kimi.family == "deepseek_v3"


@pytest.mark.parametrize("name", ["config.json", "generation_config.json",
                                  "model.safetensors.index.json"])
def test_a_file_that_is_not_utf8_is_named(ckpt, name):
    (ckpt / name).write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises((ConfigError, CheckpointError), match=rf"{name}: not UTF-8|{name}: not a "):
        load_spec(ckpt)
        Checkpoint(ckpt)


def test_weights_that_are_a_directory_are_named(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a directory"):
        Checkpoint(ckpt)


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty/config\.json: file not found"):
        load_spec(tmp_path / "empty")


def test_config_field_out_of_range(ckpt):
    edit_config(ckpt, num_experts_per_tok=99)
    with pytest.raises(ConfigError, match=r"config\.json: num_experts_per_tok=99 must be in "
                                          r"\[1, num_experts=8\]"):
        load_spec(ckpt)


def test_config_field_of_wrong_type(ckpt):
    edit_config(ckpt, hidden_size="64")
    with pytest.raises(ConfigError, match=r"config\.json: field 'hidden_size' must be an "
                                          r"integer, got '64'"):
        load_spec(ckpt)


def test_config_heads_that_do_not_divide(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=3 must divide"):
        load_spec(ckpt)


def test_missing_tensor_names_key_and_file(ckpt):
    rewrite_tensors(ckpt, lambda s: s.pop(EXPERT_KEY))
    with pytest.raises(CheckpointError, match=rf"tensor '{EXPERT_KEY}' is missing \(looked in "
                                              r"model\.safetensors\)"):
        LLM(ckpt)


def test_wrong_shape_names_key_file_and_shapes(ckpt):
    key = "model.layers.0.self_attn.k_proj.weight"

    def widen(state):
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])

    rewrite_tensors(ckpt, widen)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' has shape "
                                              r"\[33, 64\], expected \[32, 64\]"):
        LLM(ckpt)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': data_offsets"):
        Checkpoint(ckpt)


def test_header_not_json(ckpt):
    path = ckpt / "model.safetensors"
    body = b"{not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header is not valid JSON"):
        Checkpoint(ckpt)


def test_index_naming_a_missing_shard(tmp_path):
    sharded = make_tiny("olmoe", tmp_path / "s", shards=2, tokenizer=False)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: file not found"):
        Checkpoint(sharded)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
    sharded = make_tiny("olmoe", tmp_path / "s", shards=2, tokenizer=False)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lists tensor 'model\.norm\.weight' in "
                                              r"model-00001-of-00002\.safetensors"):
        Checkpoint(sharded)


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or "
                                              r"model\.safetensors\.index\.json found"):
        LLM(ckpt)


def test_checkpoint_without_tokenizer_runs_from_ids_and_rejects_text(ckpt):
    (ckpt / "tokenizer.json").unlink()
    llm = LLM(ckpt)
    [out] = llm.generate([1, 2, 3], max_new_tokens=3)
    assert len(out.token_ids) == 3 and out.text == ""
    with pytest.raises(NoTokenizerError, match=r"has no tokenizer\.json, so text prompts"):
        llm.generate("hello", max_new_tokens=3)


def test_cli_reports_bad_input_in_one_line(ckpt, capsys):
    edit_config(ckpt, model_type="gpt2")
    code = cli_main(["generate", str(ckpt), "--prompt-ids", "1,2", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("moeflow generate: error: ") and "unknown model family 'gpt2'" in err
    assert "Traceback" not in err


# VmHWM: this process's peak RSS in kB (ru_maxrss would carry the parent's over exec)
LOAD_PEAK = """
import sys
import torch
from moeflow.serve.llm import LLM


def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


base = peak()
llm = LLM(sys.argv[1], devices="cpu:0", dtype="float32")
stacks = llm.engine.executor.workers["cpu:0"].experts.values()
size = sum(t.numel() * t.element_size() for s in stacks for t in (s.gate_up, s.down))
print(peak() - base, size)
"""


def test_mxfp4_experts_load_near_their_dequantized_size(tiny_factory):
    """MXFP4 experts are dequantized one at a time: loading peaks near the size of the
    dequantized experts, not at several times it."""
    import subprocess
    import sys

    from moeflow.models.tiny import TinyShape

    shape = TinyShape(layers=2, experts=32, top_k=4, hidden=512, heads=8, kv_heads=2,
                      head_dim=64, intermediate=512)
    path = tiny_factory("gpt_oss", shape=shape, mxfp4=True)
    run = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    growth, experts = map(int, run.stdout.split())
    assert experts == 2 * 32 * 3 * 512 * 512 * 4  # fp32 gate/up and down
    print(f"MXFP4 load: peak grew {growth / 2**20:.0f} MiB for {experts / 2**20:.0f} MiB "
          f"of dequantized experts")
    assert growth <= 1.5 * experts + (64 << 20)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fields_left_out_mean_what_transformers_reads(family, tiny_factory):
    """A config without one of its fields is read as transformers' config class of the
    family reads it (its defaults), token ids aside, or refused: a shape asked for by
    name, or a field without which transformers' reading is no model either."""
    transformers = pytest.importorskip("transformers")
    full = json.loads((tiny_factory(family, tokenizer=False) / "config.json").read_text())
    for key in sorted(set(full) - {"model_type", "architectures", "transformers_version",
                                   "bos_token_id", "eos_token_id"}):
        part = {k: v for k, v in full.items() if k != key}
        try:
            theirs = transformers.AutoConfig.for_model(
                family, **{k: v for k, v in part.items() if k != "model_type"}).to_dict()
            expected = spec_from_config(theirs)
        except Exception:  # noqa: BLE001 - transformers' own validators raise their kinds
            expected = None  # what transformers makes of it is no model either
        try:
            ours = spec_from_config(part)
        except ConfigError as exc:  # a shape moeflow asks for by name (transformers would
            # take its reference model's and then fail on the weights); otherwise refused
            # only where transformers' reading is no model either
            assert "required field" in str(exc) or expected is None, (key, exc)
            continue
        assert ours == expected, key
