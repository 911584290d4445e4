"""The CPU worker on moeflow's kernels (moeflow/ops/cpu) and on torch's path gives the same
greedy tokens and near-equal logits, and each kernel is really taken when chosen."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch

from moeflow.ops import cpu as kernels
from moeflow.ops.cpu.choice import ALL_ROWS, KernelChoice, use_choice
from moeflow.serve.llm import LLM

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or not kernels.available(),
                                reason="no CPU kernels here")

PROMPTS = {0: [5, 17, 3, 99, 42, 7, 8, 61], 1: [11, 2, 9], 2: [30, 31, 32, 33, 34]}
STEPS = 6
# decode attention of these families is one fused call (its paged attention inside)
KERNELS = ("linear", "expert_ffn", "attention_decode")
WRAPPED = (*KERNELS, "paged_decode_attention")


def greedy(runner, forced: dict[int, list[int]] | None = None
           ) -> tuple[list[torch.Tensor], dict[int, list[int]]]:
    """Prefill three sequences, then decode them together: each step feeds the greedy
    token, or the one `forced` gives (so that two paths see the same inputs however a
    near-tie of their logits falls)."""
    out = runner.forward(PROMPTS)
    logits, tokens = [], {s: [] for s in PROMPTS}
    for i in range(STEPS):
        step = {}
        for s, rows in out.items():
            logits.append(rows[-1])
            tokens[s].append(int(rows[-1].argmax()))
            step[s] = [forced[s][i] if forced else tokens[s][-1]]
        out = runner.forward(step)
    return logits, tokens


def assert_same_choices(ours: list[torch.Tensor], theirs: list[torch.Tensor], atol: float
                        ) -> None:
    """Logits within atol, and the same greedy token wherever the reference's best two are
    further apart than the two paths' logits can differ (random tiny models have ties)."""
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= atol
        top = b.float().topk(2).values
        if top[0] - top[1] > 2 * atol:
            assert int(a.argmax()) == int(b.argmax())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernel_and_torch_paths_agree(family, dtype, tiny_factory, step_runner, monkeypatch):
    path = tiny_factory(family, dtype=dtype)
    calls: Counter[str] = Counter()
    for name in WRAPPED:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name, **k: calls.update([_name])
                            or _real(*a, **k))

    def run(choice: KernelChoice, forced=None):
        use_choice(choice)
        llm = LLM(path, devices="cpu:0,cpu:1", dtype=dtype)
        try:
            return greedy(step_runner(llm), forced)
        finally:
            llm.close()
            use_choice(None)

    # the prompts' attention takes torch's SDPA in both runs: the prefill kernel is not
    # bit-exact with it, and on this tiny random model a last-bit difference in a prompt's
    # attention moves logits by up to ~0.45 (exact fp32 attention against SDPA does too),
    # past what this test allows the GEMM kernels; its own test is below
    torch_logits, torch_tokens = run(KernelChoice(0, 0, "test", attention=False, fp32_rows=0,
                                                  prefill_attention=False))
    assert not calls, calls
    kernel_logits, _ = run(KernelChoice(ALL_ROWS, ALL_ROWS, "test", fp32_rows=ALL_ROWS,
                                        prefill_attention=False), forced=torch_tokens)
    assert all(calls[name] > 0 for name in KERNELS), calls
    assert_same_choices(kernel_logits, torch_logits, 0.05 if dtype == "bfloat16" else 1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_fused_decode_attention_is_the_unfused_path(family, tiny_factory, step_runner,
                                                    monkeypatch):
    """Decode attention in one kernel call gives the unfused path's logits bit for bit,
    and it is taken whenever every token of a batch decodes."""
    from moeflow.actors.worker import DeviceWorker

    path = tiny_factory(family, dtype="bfloat16")
    fused = Counter()
    real = kernels.attention_decode
    monkeypatch.setattr(kernels, "attention_decode",
                        lambda *a, **k: fused.update(["call"]) or real(*a, **k))

    def run():
        llm = LLM(path, devices="cpu:0,cpu:1", dtype="bfloat16")
        try:
            return greedy(step_runner(llm))
        finally:
            llm.close()

    use_choice(KernelChoice(ALL_ROWS, ALL_ROWS, "test", fp32_rows=ALL_ROWS))
    try:
        logits, tokens = run()
        assert fused["call"] >= STEPS, fused
        monkeypatch.setattr(DeviceWorker, "_fused_decode", lambda *a: False)
        fused.clear()
        unfused_logits, unfused_tokens = run()
        assert not fused
    finally:
        use_choice(None)
    assert tokens == unfused_tokens
    for ours, theirs in zip(logits, unfused_logits):
        assert torch.equal(ours, theirs)


def test_prefill_attention_kernel_in_the_worker(tiny_factory, step_runner, monkeypatch):
    """A prompt's attention on the prefill kernel (AVX-512 BF16) and on torch's SDPA give
    logits within what the two round differently (the same forced tokens), and the kernel
    is taken for every prompt when chosen, never when not."""
    if kernels.best_isa() < 2:
        pytest.skip("the prefill attention kernel needs AVX-512 BF16")
    path = tiny_factory("qwen3_moe", dtype="bfloat16")
    calls: Counter[str] = Counter()
    real = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention",
                        lambda *a, **k: calls.update(["call"]) or real(*a, **k))

    def run(on: bool, forced=None):
        use_choice(KernelChoice(0, 0, "test", attention=False, fp32_rows=0,
                                prefill_attention=on))
        llm = LLM(path, devices="cpu:0,cpu:1", dtype="bfloat16")
        try:
            return greedy(step_runner(llm), forced), llm.spec.num_layers
        finally:
            llm.close()
            use_choice(None)

    (sdpa_logits, tokens), _ = run(False)
    assert not calls
    (kernel_logits, _), layers = run(True, forced=tokens)
    assert calls["call"] == len(PROMPTS) * layers  # each prompt, in each layer
    assert_same_choices(kernel_logits, sdpa_logits, 0.05)
