"""Measure this machine's CPU as a roofline device for the simulator.

    peak_flops       best bf16 / fp32 GEMM rate over a few prefill-like shapes (oneDNN)
    gemm_half_rows   from the rate of an MoE-like grouped GEMM (64 experts x 64 rows) set
                     against the peak: efficiency m/(m+h) at m=64 gives h
    mem_bandwidth    how fast decode streams weights: single-row bf16 GEMVs over cold
                     matrices on the CPU worker's path (moeflow's kernels, ops/cpu); up
                     to `gemv_rows` rows per weight a GEMM is held to this rate alone
    activation_bandwidth  a bf16 SwiGLU pass over large activations
    attention_flops  causal flash attention over 512 tokens
    launch_overhead  time per op, measured in situ: decode steps of a tiny model through
                     the real in-process executor, whose compute is negligible, divided by
                     the cost model's op count for that step's graph

The result is a `Hardware` with one CPU device, written as JSON by `moeflow calibrate`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeflow.ops.backend import SMALL_GEMM_ROWS
from moeflow.ops.cpu.calibrate import best_time
from moeflow.sim.hardware import DeviceSpec, Hardware, LinkSpec


def _best_rate(work: float, fn: Callable[[], object], repeats: int) -> float:
    return work / best_time(fn, repeats)


def gemm_peak(dtype: torch.dtype, repeats: int) -> float:
    torch._C._set_mkldnn_enabled(True)
    best = 0.0
    for m, n, k in ((512, 2048, 1024), (2048, 2048, 2048), (4096, 768, 1024)):
        a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        best = max(best, _best_rate(2 * m * n * k, lambda: F.linear(a, w), repeats))
    return best


def grouped_rate(repeats: int, experts: int = 64, rows: int = 64) -> float:
    torch._C._set_mkldnn_enabled(True)
    d, f = 1024, 768
    w = torch.randn(experts, f, d, dtype=torch.bfloat16)
    x = torch.randn(experts * rows, d, dtype=torch.bfloat16)
    ends = (torch.arange(1, experts + 1) * rows).to(torch.int32)
    return _best_rate(2 * experts * rows * d * f,
                      lambda: F.grouped_mm(x, w.transpose(1, 2), offs=ends), repeats)


def elementwise_bandwidth(repeats: int) -> float:
    """Bytes/s of a bf16 SwiGLU pass (read two tensors, write one) over 3 x 64 MB."""
    x = torch.randn(4096, 8192, dtype=torch.bfloat16)
    y = torch.randn(4096, 8192, dtype=torch.bfloat16)
    return _best_rate(3 * x.numel() * 2, lambda: F.silu(x).mul_(y), repeats)


def attention_rate(repeats: int) -> float:
    """FLOP/s of causal flash attention over 512 tokens, 16 heads of 64 (bf16)."""
    q = torch.randn(1, 16, 512, 64, dtype=torch.bfloat16)
    pairs = 512 * 513 // 2
    return _best_rate(2 * pairs * 16 * 128, lambda: F.scaled_dot_product_attention(
        q, q, q, is_causal=True), repeats)


def weight_stream_bandwidth(repeats: int) -> float:
    """Bytes/s of single-row bf16 GEMVs over ~0.6 GB of cold [768, 1024] weights, on the
    CPU worker's path for one row (moeflow's kernel, or torch's native GEMV without it)."""
    from moeflow.ops.cpu.choice import linear

    try:
        w = torch.randn(400, 768, 1024, dtype=torch.bfloat16)
        x = torch.randn(1, 1024, dtype=torch.bfloat16)
        return _best_rate(w.numel() * 2, lambda: [linear(x, w[i]) for i in range(len(w))],
                          repeats)
    finally:
        torch._C._set_mkldnn_enabled(True)


def per_op_overhead(hw_probe: Hardware, steps: int) -> float:
    """Seconds per op, from decode steps of a tiny model through the real executor."""
    from moeflow.dataflow.compiler import compile
    from moeflow.dataflow.graph import SeqChunk, Unit
    from moeflow.models.tiny import TinyShape, make_tiny
    from moeflow.sim.cost import CostModel
    from moeflow.serve.llm import LLM
    from moeflow.ops.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny("qwen3_moe", tmp, TinyShape(layers=4, experts=8, top_k=2),
                         dtype="bfloat16", tokenizer=False)
        llm = LLM(path)
        params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
        llm.generate([1, 2, 3, 4], sampling=params)  # warm up
        times = []
        for _ in range(3):
            [out] = llm.generate([1, 2, 3, 4], sampling=params)
            times.append((out.e2e_s - out.ttft_s) / steps)
        step = statistics.median(times)
        unit = Unit((SeqChunk(0, 8, 1, "cpu:0"),))
        graph = compile(llm.spec, unit, llm.engine.cluster.placement)
        cost = CostModel(llm.spec, hw_probe)
        kernels = sum(cost.cost(graph, n, [1] * max(1, len(getattr(n, "experts", ())))).kernels
                      for n in graph.nodes)
        return step / kernels


def calibrate(quick: bool = False, log: Callable[[str], None] = lambda _: None) -> Hardware:
    repeats = 2 if quick else 5
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    log(f"calibrating with {threads} torch threads ..." + (
        f" (fewer than the {cores} cores this process may use: OMP_NUM_THREADS? the figures "
        f"are those of {threads})" if cores and threads < cores else ""))
    bf16 = gemm_peak(torch.bfloat16, repeats)
    fp32 = gemm_peak(torch.float32, repeats)
    log(f"  GEMM peak: bf16 {bf16 / 1e9:.0f} GFLOP/s, fp32 {fp32 / 1e9:.0f} GFLOP/s")
    grouped = grouped_rate(repeats)
    efficiency = min(grouped / bf16, 0.99)
    half_rows = 64 * (1 / efficiency - 1)
    log(f"  grouped GEMM at 64 rows/expert: {grouped / 1e9:.0f} GFLOP/s -> half rate at "
        f"{half_rows:.0f} rows")
    bandwidth = weight_stream_bandwidth(repeats)
    log(f"  weights stream at {bandwidth / 1e9:.1f} GB/s (single-row GEMV)")
    activations = elementwise_bandwidth(repeats)
    attention = attention_rate(repeats)
    log(f"  elementwise passes at {activations / 1e9:.1f} GB/s; attention kernel at "
        f"{attention / 1e9:.0f} GFLOP/s")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    probe = Hardware("probe", DeviceSpec("probe", "cpu", {"bfloat16": bf16}, bandwidth, memory),
                     1, LinkSpec(bandwidth), LinkSpec(bandwidth))
    overhead = per_op_overhead(probe, 16 if quick else 32)
    log(f"  {overhead * 1e6:.1f} us per op (in-process executor)")
    device = DeviceSpec(f"cpu-{threads}t", "cpu",
                        {"bfloat16": bf16, "float16": bf16, "float32": fp32}, bandwidth,
                        float(memory), launch_overhead=overhead, gemm_half_rows=half_rows,
                        gemv_rows=SMALL_GEMM_ROWS - 1, activation_bandwidth=activations,
                        attention_flops=attention, cores=threads)
    # virtual devices in one process hand tensors over by reference: a copy at most
    link = LinkSpec(bandwidth * 2, 2e-6)
    return Hardware("cpu-calibrated", device, 1, link, link, float(memory),
                    notes=f"measured by moeflow calibrate with {threads} threads")
