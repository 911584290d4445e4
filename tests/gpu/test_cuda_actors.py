"""CUDA actors (skipped without a GPU): a cuda:N actor gives the CPU's results, in process
and as actor processes, with GPU-to-GPU transfers staged through host memory."""

from __future__ import annotations

import pytest
import torch

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.models.families import load_spec
from moeflow.scheduler import BatchEP, Cluster
from moeflow.testing.conformance import record_generation

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 17, 33, 2, 99], [8, 9, 10]]


@pytest.fixture(autouse=True)
def exact_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def run(path, devices, transport="inproc", dtype=torch.float32):
    spec = load_spec(path)
    cluster = Cluster.sharded(devices, spec.moe.num_experts)
    if transport == "inproc":
        executor = InProcessExecutor(load_workers(path, spec, cluster.placement, dtype, 4096),
                                     want_logits=True)
        return record_generation(executor, spec, BatchEP(), cluster, PROMPTS, 6)
    with ZmqExecutor(str(path), cluster.placement, str(dtype).removeprefix("torch."), 4096,
                     want_logits=True) as executor:
        return record_generation(executor, spec, BatchEP(), cluster, PROMPTS, 6)


def close(a, b, atol):
    return all(len(a[k]) == len(b[k]) and all((x.cpu() - y.cpu()).abs().max() <= atol
                                              for x, y in zip(a[k], b[k])) for k in a)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_a_cuda_actor_matches_the_cpu(family, tiny_factory):
    path = tiny_factory(family)
    cpu_tokens, cpu_logits = run(path, ("cpu:0",))
    gpu_tokens, gpu_logits = run(path, ("cuda:0",))
    assert gpu_tokens == cpu_tokens and close(gpu_logits, cpu_logits, 1e-3)


def test_two_gpus_in_process_and_as_actor_processes(tiny_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    path = tiny_factory("mixtral")
    ref_tokens, ref_logits = run(path, ("cpu:0",))
    for transport in ("inproc", "zmq"):
        tokens, logits = run(path, ("cuda:0", "cuda:1"), transport)
        assert tokens == ref_tokens and close(logits, ref_logits, 1e-3), transport


def test_a_cuda_actor_process_in_bfloat16(tiny_factory):
    path = tiny_factory("qwen3_moe", dtype="bfloat16")
    cpu_tokens, _ = run(path, ("cpu:0",), dtype=torch.bfloat16)
    tokens, _ = run(path, ("cuda:0",), "zmq", dtype=torch.bfloat16)
    agree = sum(a == b for k in cpu_tokens for a, b in zip(cpu_tokens[k], tokens[k]))
    assert agree >= 0.8 * sum(len(v) for v in cpu_tokens.values())
