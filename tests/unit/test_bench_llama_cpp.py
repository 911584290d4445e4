"""benchmarks/foundation.py's llama.cpp column and its engines' own processes, and
benchmarks/llama_cpp.py, without building anything: the tools' output parsed as they
print it, the engines' rounds interleaved, the pre-tokenizer named from tokenizer.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import foundation  # noqa: E402
import llama_cpp  # noqa: E402

from moeflow.models.tokenizer import train_tokenizer  # noqa: E402


def llama_bench_test(n_prompt: int, n_gen: int, ts: float) -> str:
    return (f'  {{\n    "build_commit": "0c1e570",\n    "model_type": "qwen3moe 30B.A3B BF16",\n'
            f'    "n_threads": 2,\n    "n_prompt": {n_prompt},\n    "n_gen": {n_gen},\n'
            f'    "avg_ns": 1000,\n    "avg_ts": {ts:.6f},\n    "stddev_ts": 0.000000,\n'
            f'    "samples_ns": [ 1000 ],\n    "samples_ts": [ {ts} ]\n  }}')


def test_llama_bench_json_gives_pp512_and_tg64() -> None:
    out = "[\n" + ",\n".join([llama_bench_test(512, 0, 812.5),
                              llama_bench_test(0, 64, 41.25)]) + "\n]\n"
    assert foundation.llama_bench_rates(out) == (812.5, 41.25)


def test_llama_bench_json_without_the_tests_is_refused() -> None:
    with pytest.raises(ValueError):
        foundation.llama_bench_rates("[\n" + llama_bench_test(128, 0, 1.0) + "\n]\n")


def test_batched_bench_jsonl_gives_the_batch_16_decode_rate() -> None:
    row = {"n_kv_max": 2048, "pp": 16, "tg": 64, "pl": 16, "n_kv": 1280, "t_pp": 0.5,
           "speed_pp": 512.0, "t_tg": 8.0, "speed_tg": 128.0, "t": 8.5, "speed": 150.6}
    out = f"\nmain: n_kv_max = 2048\n{json.dumps(row)}\n\nllama_perf_context_print: ...\n"
    assert foundation.batched_bench_rate(out) == 128.0
    with pytest.raises(ValueError):
        foundation.batched_bench_rate(out.replace('"pl": 16', '"pl": 8'))


def test_engines_run_in_turn_and_report_medians() -> None:
    calls: list[str] = []

    def sampler(name: str, values: list[float]):  # type: ignore[no-untyped-def]
        it = iter(values)

        def sample() -> dict[str, float]:
            calls.append(name)
            return {"decode_bs1_tok_s": next(it)}
        return sample

    got = foundation.interleaved({"a": sampler("a", [100.0, 1.0, 3.0, 2.0]),
                                  "b": sampler("b", [0.0, 10.0, 30.0, 20.0])}, repeats=3)
    assert calls == ["a", "b"] * 4  # a warm-up round (dropped), then 3 rounds
    assert got == {"a": {"decode_bs1_tok_s": 2.0}, "b": {"decode_bs1_tok_s": 20.0}}


CHILD = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[2] / "benchmarks")!r})
""" + """
import foundation
calls = []
def fake(path, devices):
    print("an engine's chatter on stdout")
    def sample():
        calls.append(1)
        print("more chatter")
        return {"decode_bs1_tok_s": 10.0 * len(calls), "devices": len(devices)}
    return sample
foundation.SAMPLERS["fake"] = fake
sys.exit(foundation.serve_sampler("fake", foundation.Path("."), "cpu:0"))
"""


def test_an_engine_samples_in_a_process_of_its_own() -> None:
    sample, child = foundation.in_own_process("fake", [sys.executable, "-c", CHILD])
    try:
        assert sample() == {"decode_bs1_tok_s": 10.0, "devices": 5.0}
        assert sample()["decode_bs1_tok_s"] == 20.0  # the same process, loaded once
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    with pytest.raises(RuntimeError, match="the fake process exited with 1"):
        foundation.in_own_process("fake", [sys.executable, "-c", "import sys; sys.exit(1)"])


def test_our_tokenizer_is_named_gpt2_and_others_are_refused(tmp_path: Path) -> None:
    train_tokenizer(["hello world", "it's 33 apples"], 300).save(str(tmp_path / "tokenizer.json"))
    assert llama_cpp.pre_tokenizer(tmp_path) == "gpt-2"
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"pre_tokenizer": {"type": "Metaspace", "replacement": "_"}}))
    with pytest.raises(llama_cpp.SetupError, match="Metaspace"):
        llama_cpp.pre_tokenizer(tmp_path)


def test_the_gguf_is_named_after_the_checkpoint(tmp_path: Path) -> None:
    assert foundation.gguf_path(tmp_path, Path("x/bench-qwen3-moe")) == \
        tmp_path / "bench-qwen3-moe-bf16.gguf"


def test_a_missing_toolchain_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp.shutil, "which", lambda tool: None if tool == "cmake" else tool)
    with pytest.raises(llama_cpp.SetupError, match="apt-get install cmake build-essential"):
        llama_cpp.check_toolchain()
