"""CGOPipe against FlexGen: decode throughput when the GPU holds only part of the weights,
side by side in one run, simulated at the paper's scale and measured for real.

Simulated (`--only sim`): MoE-Lightning's setting S1, Mixtral 8x7B on one T4 with its
host (the paper's figures: 48 cores at 0.8 TFLOP/s, 100 GiB/s, 192 GB, a 16 GiB/s link),
MTBench-like prompts (lognormal, mean 77 tokens), generation 32 / 64 / 128 / 256. For each
length HRM's searched policy (`moeflow plan`) gives cgopipe its micro-batch size μ and its
batch N; a burst of N requests runs under cgopipe (micro-batches of μ, KV on the host) and
under flexgen (KV on the GPU: as many at once as its memory holds). Prefill goes a step of at
most so many tokens at a time: for cgopipe a micro-batch's prompts (μ times the mean
prompt, as HRM's memory model budgets a prefill chunk), for flexgen the better of 4096 and
8192 (fewer tokens a step leave its KV cache, on the GPU, more room; more make fewer
weight passes). Throughput: generated tokens over the makespan, prefill included, as the
paper counts it. The paper (its Table
3): MoE-Lightning 63.0 / 101.3 / 97.7 / 96.7 tok/s, FlexGen 12.1 / 12.3 / 9.5 / 9.6.

Attention (`--only attention`): the host's decode attention, one layer of Mixtral's heads,
against the memory roofline of its KV read on this machine, by both paths the worker has:
`kernel`, the CPU kernel reading the paged cache in place (moeflow.ops.cpu, what the host
actor runs where the kernels are built), and `torch`, the block table gathered, then
torch's attention (the fallback). The two are checked to agree first. The compute roof
beside it: 4 FLOP per query head, key and head dimension at an fp32 matmul's rate here
(the kernel widens bf16 to fp32); with 4 query heads per KV head that is 4 FLOP per byte
read, so a CPU with little FMA throughput per byte of bandwidth is compute-bound.

Real (`--only real`): `make demo`'s checkpoint on two CPU actor processes
(`--transport zmq`), cpu:0 standing in for the GPU (it holds its 8 of the 16 experts and
pages the other 8 in from cpu:1, layer by layer) and cpu:1 for its host. A burst of
`--requests` prompts of 64 random token ids, `--gen` new tokens each (greedy, eos
ignored), batched as batch-ep batches. Policies, alternating, `--rounds` rounds:

    flexgen   attention on the GPU, each layer's offloaded experts as one page, the next
              layer's while this one computes
    cgopipe   3 micro-batches; attention's core on the host over the host's KV cache, the
              GPU two micro-batches ahead; pages per micro-batch
    cgopipe, HRM  the same with HRM's micro-batch size for this machine (`moeflow calibrate
              --quick`, its CPU standing for the GPU and the host) and this load, as
              `--hardware FILE` gives it
    batch-ep  expert parallelism over both actors (no paging): for reference

Throughput is generated tokens per wall second of the whole run (prefill included, as
MoE-Lightning counts it); medians. Every policy must give the same tokens, and the
run checks that they do.

    python benchmarks/cgopipe.py [--only sim,real,attention] [--requests 24] [--gen 32] [--rounds 3]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

from moeflow.scheduler.base import Scheduler
from moeflow.scheduler.batch_ep import BatchEP
from moeflow.scheduler.cgopipe import CGOPipe, FlexGen

PROMPT_LEN = 64
SECTIONS = ("sim", "real", "attention")
GENS = (32, 64, 128, 256)
# MoE-Lightning (arXiv 2411.11217) Table 3, S1: generation tok/s by generation length
PAPER = {32: (63.0, 12.1), 64: (101.3, 12.3), 128: (97.7, 9.5), 256: (96.7, 9.6)}
PAPER_POLICY = "N=2296 μ=164 n_ub=14"  # as `moeflow plan` reports the paper's S1 policy
FLEXGEN_STEP_TOKENS = (4096, 8192)  # flexgen's tokens per step: the better of these


def run_sim(gens: tuple[int, ...]) -> list[dict[str, Any]]:
    from moeflow.sim import hardware, models
    from moeflow.sim.hrm import MTBENCH_PROMPT, Workload
    from moeflow.sim.hrm_search import load_system, search
    from moeflow.sim.offload import offload_layout
    from moeflow.sim.simulator import Simulator
    from moeflow.sim.workload import Lengths, Routing, requests

    spec = models.load("mixtral-8x7b")
    hw = hardware.load("t4")
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k,
                            spec.num_layers, seed=0)

    def throughput(policy: Scheduler, reqs: list[Any], n: int, batch_tokens: int
                   ) -> tuple[float, int]:
        start = time.perf_counter()
        placement, homes = offload_layout(spec, hw, policy, None, batch_tokens, n)
        sim = Simulator(spec, hw, policy, routing, placement=placement, homes=homes,
                        max_batch_tokens=batch_tokens, max_seqs=n)
        result = sim.run(reqs, record=False)
        print(f"simulated gen {reqs[0].output} {policy.name}, {batch_tokens} tokens a step: "
              f"{result.metrics.throughput:.1f} tok/s, {time.perf_counter() - start:.1f} s "
              f"wall", file=sys.stderr)
        return result.metrics.throughput, len(placement.experts_of(homes[0]))

    rows = []
    for gen in gens:
        found = search(spec, load_system("t4"), Workload(MTBENCH_PROMPT, gen)).policy
        n, mu = found.batch_size, found.micro_batch_size
        reqs = requests("burst", n, Lengths.parse(f"lognormal:{MTBENCH_PROMPT},0.6"),
                        Lengths.parse(f"fixed:{gen}"), seed=0)
        # cgopipe prefills a micro-batch at a time, as HRM's memory model budgets it
        chunk = -(-mu * MTBENCH_PROMPT // 1024) * 1024
        # HRM's micro-batches as the engine takes them (`hrm_cgopipe`): μ requests, a step
        # of decodes alone in 3 of up to μ prompts' tokens
        tok_s, resident = throughput(
            CGOPipe(micro_batches=found.num_micro_batches, micro_batch_size=mu,
                    micro_batch_tokens=mu * MTBENCH_PROMPT), reqs, n, chunk)
        row: dict[str, Any] = {"gen": gen, "policy": f"N={n} μ={mu} n_ub={n // mu}",
                               "cgopipe": tok_s, "cgopipe_tokens_per_step": chunk,
                               "cgopipe_resident_experts": resident}
        # flexgen at its best: fewer tokens a step leave its KV (on the GPU) more room
        best = max((throughput(FlexGen(), reqs, n, t), t) for t in FLEXGEN_STEP_TOKENS)
        (row["flexgen"], row["flexgen_resident_experts"]), row["flexgen_tokens_per_step"] = best
        row["ratio"] = row["cgopipe"] / row["flexgen"]
        ours, theirs = PAPER[gen]
        row["paper_cgopipe"], row["paper_flexgen"], row["paper_ratio"] = (
            ours, theirs, ours / theirs)
        rows.append(row)
    return rows


def sim_table(rows: list[dict[str, Any]]) -> str:
    lines = ["# simulated: MoE-Lightning's S1, Mixtral 8x7B on one T4 and its host, "
             "MTBench-like prompts",
             "| gen | HRM policy | cgopipe tok/s | flexgen tok/s | ratio | paper: "
             "MoE-Lightning | FlexGen | ratio |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['gen']} | {r['policy']} | {r['cgopipe']:,.1f} | "
                     f"{r['flexgen']:,.1f} | {r['ratio']:.1f}x | {r['paper_cgopipe']} | "
                     f"{r['paper_flexgen']} | {r['paper_ratio']:.1f}x |")
    lines.append(f"(the paper's own S1 policy: {PAPER_POLICY}; experts resident on the "
                 f"GPU: {rows[0]['cgopipe_resident_experts']} of 8 under cgopipe, "
                 f"{rows[0]['flexgen_resident_experts']} under flexgen; tokens a step: "
                 f"cgopipe a micro-batch's prompts, "
                 f"{', '.join(str(r['cgopipe_tokens_per_step']) for r in rows)}; flexgen "
                 f"its best of {' and '.join(map(str, FLEXGEN_STEP_TOKENS))}: "
                 f"{', '.join(str(r['flexgen_tokens_per_step']) for r in rows)})")
    return "\n".join(lines)


# the host's decode attention: Mixtral's heads (32 query, 8 KV of 128), one layer
ATTENTION_HEADS, ATTENTION_KV_HEADS, ATTENTION_DIM = 32, 8, 128
ATTENTION_SHAPES = ((16, 512), (64, 512), (16, 2048))  # (sequences, context)


def run_attention(repeats: int = 5) -> list[dict[str, Any]]:
    """CGOPipe's CPU attention as the host actor runs it (`DeviceWorker._attend`'s decode
    path: the paged KV cache read by block table, then attention), against the memory
    roofline of its KV read: the bytes of every sequence's cached keys and values over
    the bandwidth a streaming read reaches here (a sum over 512 MB, the best of 5)."""
    import torch

    from moeflow.actors.kvcache import PagedKVCache
    from moeflow.ops import cpu as kernels
    from moeflow.ops.attention import decode_attention
    from moeflow.ops.backend import index_tensor

    big = torch.ones(256 << 20, dtype=torch.bfloat16)
    stream = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        stream.append(big.numel() * 2 / (time.perf_counter() - start))
    bandwidth = max(stream)
    del big
    a, b = torch.randn(512, 512), torch.randn(512, 512)  # fp32 FMA peak: a matmul in cache
    gemm = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        gemm.append(10 * 2 * 512 ** 3 / (time.perf_counter() - start))
    flops_peak = max(gemm)
    heads, kv_heads, d = ATTENTION_HEADS, ATTENTION_KV_HEADS, ATTENTION_DIM
    width = 2 * kv_heads * d
    rows = []
    for batch, context in ATTENTION_SHAPES:
        kv = PagedKVCache(1, width, torch.bfloat16, batch * context + 16 * batch,
                          initial_tokens=batch * context + 16 * batch)
        for seq in range(batch):
            slots = index_tensor(kv.reserve_slots(seq, 0, context))
            kv.write(0, slots, torch.randn(context, width, dtype=torch.bfloat16))
        blocks, _ = kv.block_table(list(range(batch)))
        table = index_tensor(blocks)
        q = torch.randn(batch, heads, d, dtype=torch.bfloat16)

        def torch_path() -> torch.Tensor:
            cached = kv.read_blocks(0, table, batch)[:, :context]
            k, v = cached.unflatten(-1, (2, kv_heads, d)).unbind(-3)
            return decode_attention(q, k, v, None, d ** -0.5)

        def kernel_path() -> torch.Tensor:
            return kernels.paged_decode_attention(q, kv.pools[0], table, [context] * batch,
                                                  kv.block_size, kv_heads, None, d ** -0.5)

        paths = {"torch": torch_path}
        if kernels.available():
            paths["kernel"] = kernel_path
            torch.testing.assert_close(kernel_path().float(), torch_path().float(),
                                       atol=2e-2, rtol=2e-2)
        read = batch * context * width * 2
        flops = 4 * batch * context * heads * d  # q.k and p.v, per query head and key
        for name, path in paths.items():
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                path()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times[1:])
            rows.append({"path": name, "sequences": batch, "context": context,
                         "kv_mb": read / 1e6, "ms": seconds * 1e3,
                         "gb_s": read / seconds / 1e9, "roofline": read / bandwidth / seconds,
                         "compute_roof": flops / flops_peak / seconds})
    return [{"stream_gb_s": bandwidth / 1e9, "gflop_s": flops_peak / 1e9,
             "threads": torch.get_num_threads()}, *rows]


def hrm_here(spec: Any, requests: int, gen: int) -> CGOPipe:
    """cgopipe with HRM's policy for this machine (`moeflow calibrate --quick`, its CPU
    standing for the GPU and the host) and this load, as `--hardware FILE` gives it."""
    from moeflow.sim.calibrate import calibrate
    from moeflow.sim.hrm import Workload
    from moeflow.sim.hrm_search import hrm_cgopipe, system_of

    print("calibrating this machine for HRM ...", file=sys.stderr)
    system = system_of(calibrate(quick=True), "bfloat16")
    policy, line = hrm_cgopipe(spec, system, Workload(PROMPT_LEN, gen), requests)
    print(line, file=sys.stderr)
    return policy


def run_real(requests: int, gen: int, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine import DEVICES, demo_checkpoint

    from moeflow.actors.coordinator import ZmqExecutor
    from moeflow.models.families import load_spec
    from moeflow.ops.sampling import SamplingParams
    from moeflow.scheduler.base import Cluster
    from moeflow.serve.engine import EngineCore

    checkpoint = demo_checkpoint()
    spec = load_spec(checkpoint)
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, spec.vocab_size) for _ in range(PROMPT_LEN)]
               for _ in range(requests)]
    policies: dict[str, Scheduler] = {"flexgen": FlexGen(), "cgopipe": CGOPipe(),
                                      "cgopipe, HRM": hrm_here(spec, requests, gen),
                                      "batch-ep": BatchEP()}
    seconds: dict[str, list[float]] = {name: [] for name in policies}
    outputs: dict[str, list[list[int]]] = {}
    with ZmqExecutor(str(checkpoint), cluster.placement, "bfloat16", 65536) as executor:
        for r in range(rounds):
            for name, policy in policies.items():
                core = EngineCore(spec, executor, policy, cluster, max_batch_tokens=4096,
                                  max_seqs=requests)
                params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
                start = time.perf_counter()
                reqs = [core.add_request(p, params) for p in prompts]
                while core.has_unfinished():
                    for job in core.schedule():
                        [result] = executor.run_many([core.job_spec(job)])
                        core.complete(job, result)
                seconds[name].append(time.perf_counter() - start)
                outputs[name] = [list(q.output_ids) for q in reqs]
                for rid in list(core.requests):
                    core.pop_finished(rid)
                print(f"round {r + 1}/{rounds} {name}: {seconds[name][-1]:.1f} s",
                      file=sys.stderr)
    same = all(out == outputs["batch-ep"] for out in outputs.values())
    tokens = requests * gen
    rows = [{"policy": name, "tok_s": tokens / statistics.median(runs),
             "seconds": runs} for name, runs in seconds.items()]
    flexgen = statistics.median(seconds["flexgen"])
    for row in rows:
        row["vs_flexgen"] = flexgen / statistics.median(seconds[row["policy"]])
    return {"requests": requests, "gen": gen, "rounds": rounds, "same_tokens": same,
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--gens", default=",".join(map(str, GENS)),
                        help="generation lengths simulated (of 32, 64, 128, 256)")
    parser.add_argument("--json", dest="json_out", help="write the results as JSON here")
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json_out, "--json")  # before minutes of measuring
    if min(args.requests, args.gen, args.rounds) < 1:
        parser.error("--requests, --gen and --rounds must be >= 1")
    only = args.only.split(",")
    if not set(only) <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}")
    try:
        gens = tuple(int(g) for g in args.gens.split(","))
    except ValueError:
        gens = ()
    if not gens or not set(gens) <= set(GENS):
        parser.error(f"--gens takes {', '.join(map(str, GENS))} (the paper's lengths)")
    out: dict[str, Any] = {}
    if "sim" in only:
        out["sim"] = run_sim(gens)
        print(sim_table(out["sim"]))
    if "attention" in only:
        head, *rows = out["attention"] = run_attention()
        print(f"# the host's decode attention, one layer of Mixtral's heads (32 query, 8 KV of "
              f"128), bf16, {head['threads']} threads; roofs: the KV read at "
              f"{head['stream_gb_s']:.1f} GB/s (a streaming sum here), its 4 FLOP per query "
              f"head and key at {head['gflop_s']:.0f} GFLOP/s (an fp32 matmul here)")
        print("| path | sequences | context | KV read | ms | GB/s | of the memory roof | "
              "of the compute roof |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['path']} | {r['sequences']} | {r['context']} | {r['kv_mb']:.0f} MB | "
                  f"{r['ms']:.1f} | {r['gb_s']:.1f} | {r['roofline']:.0%} | "
                  f"{r['compute_roof']:.0%} |")
    if "real" not in only:
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(out, f, indent=2)
        return 0
    real = out["real"] = run_real(args.requests, args.gen, args.rounds)
    print(f"# for real: make demo's checkpoint, cpu:0 as the GPU (8 of 16 experts resident), "
          f"cpu:1 as its host; {args.requests} prompts of {PROMPT_LEN} tokens, "
          f"{args.gen} new tokens each; medians of {args.rounds} alternating rounds")
    print("| policy | tok/s | vs flexgen |\n|---|---:|---:|")
    for row in real["rows"]:
        print(f"| {row['policy']} | {row['tok_s']:,.1f} | {row['vs_flexgen']:.2f}x |")
    print(f"same tokens from all four: {real['same_tokens']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0 if real["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
