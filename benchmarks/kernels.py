"""The fused MoE kernels against the roofline, side by side in one run (needs CUDA).

Expert shapes, bf16, random weights and router logits:

    mixtral   Mixtral-8x7B    D 4096, F 14336, E 8,   A 2
    qwen3     Qwen3-30B-A3B   D 2048, F 768,   E 128, A 8

For T = 1, 2, 4, ..., 64 (decode) and T = 4096 (prefill), each row times

    fused       moeflow.ops.triton.fused_moe (GroupGemm: align, gate_up + SiLU, down)
    dense       moeflow.ops.triton.dense_moe (DenseGemm: one matmul per expert hit)
    grouped_mm  the same routing through torch.nn.functional.grouped_mm, when torch has it
                (sort pairs, two grouped GEMMs, weighted unsort-sum: no host sync)

fused and grouped_mm are timed as CUDA graph replays (device time) and fused also as plain
launches from Python; dense syncs with the host, so it runs plainly.

against the floor max(bytes / bandwidth, flops / matmul rate): bytes are the experts hit
(3·F·D·2 each) plus x, the intermediate and the output; flops are 6·P·F·D for P = T·A pairs.
Both ceilings are measured in the same run: a 2 GiB device-to-device copy (bytes read +
written) and an 8192³ bf16 matmul. Times are medians of triton.testing.do_bench.

    python benchmarks/kernels.py [--json out.json] [--models mixtral,qwen3] [--tune]

--tune first sweeps a few tile configs per token count and writes
moeflow/ops/triton/configs/<key>.json for this GPU; the timed rows then use it. Without CUDA
it runs a tiny correctness check under TRITON_INTERPRET=1, says so in one line, and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DECODE = (1, 2, 4, 8, 16, 32, 64)
PREFILL = 4096
TUNE_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class ExpertShape:
    name: str
    hidden: int  # D
    ffn: int  # F
    num_experts: int  # E
    top_k: int  # A


MODELS = {"mixtral": ExpertShape("mixtral", 4096, 14336, 8, 2),
          "qwen3": ExpertShape("qwen3", 2048, 768, 128, 8)}


def interpreter_check() -> int:
    """No CUDA: one tiny fused_moe under the interpreter against its reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from moeflow.ops.triton.fused_moe import fused_moe, fused_moe_ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    gate_up = torch.randn(4, 64, 32, generator=g) / 32**0.5
    down = torch.randn(4, 32, 32, generator=g) / 32**0.5
    weights, ids = torch.softmax(torch.randn(4, 4, generator=g), -1).topk(2, dim=-1)
    err = (fused_moe(x, gate_up, down, ids, weights) - fused_moe_ref(x, gate_up, down, ids,
                                                                      weights)).abs().max()
    ok = err.item() < 1e-4
    print(f"no CUDA: GPU timings skipped; interpreter check of fused_moe "
          f"{'passed' if ok else 'FAILED'} (max error {err.item():.1e})")
    return 0 if ok else 1


def bench(fn: Any, graph: bool = False) -> float:
    """Median milliseconds of fn(), launched from Python or replayed as a CUDA graph (the
    device time, without the launch overhead that dominates small decode batches)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def ceilings() -> dict[str, float]:
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench(lambda: a @ b)
    return {"bytes_per_s": 2 * (1 << 31) / (copy_ms * 1e-3),
            "flops_per_s": 2 * 8192**3 / (mm_ms * 1e-3)}


def problem(shape: ExpertShape, num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, shape.hidden, device="cuda", generator=g).to(torch.bfloat16)
    logits = torch.randn(num_tokens, shape.num_experts, device="cuda", generator=g)
    weights, ids = torch.softmax(logits, -1).topk(shape.top_k, dim=-1)  # [T, A]
    return x, ids, weights


def experts(shape: ExpertShape) -> tuple[torch.Tensor, torch.Tensor]:
    d, f, e = shape.hidden, shape.ffn, shape.num_experts
    gate_up = torch.empty(e, 2 * f, d, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    down = torch.empty(e, d, f, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    return gate_up, down


def grouped_mm_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fused_moe's contract through torch's grouped_mm, with no host sync."""
    from moeflow.ops.experts import grouped_swiglu

    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)  # [P]
    order = flat.argsort()
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    rows = grouped_swiglu(x[order // top_k], counts.cumsum(0, dtype=torch.int32), gate_up,
                          down)  # [P, D] by expert
    out = torch.empty_like(rows)
    out[order] = rows * weights.reshape(-1)[order, None].to(rows.dtype)
    return out.view(num_tokens, top_k, -1).sum(dim=1)  # [T, D]


def floor_s(shape: ExpertShape, num_tokens: int, num_hit: int,
            ceil: dict[str, float]) -> tuple[float, str, float, float]:
    """(seconds, bound, bytes, flops) of the fewest bytes and flops a fused MoE needs."""
    d, f = shape.hidden, shape.ffn
    pairs = num_tokens * shape.top_k
    nbytes = 2 * (3 * num_hit * f * d + 2 * num_tokens * d + 2 * pairs * f)
    flops = 6 * pairs * f * d
    mem, comp = nbytes / ceil["bytes_per_s"], flops / ceil["flops_per_s"]
    return max(mem, comp), "mem" if mem >= comp else "flop", nbytes, flops


def tune(shape: ExpertShape, gate_up: torch.Tensor, down: torch.Tensor) -> Path:
    from moeflow.ops.triton.configs import CONFIG_DIR, TileConfig, config_key, write_configs
    from moeflow.ops.triton.fused_moe import device_name, fused_moe

    candidates = [TileConfig(bm, bn, bk, group_m=gm, num_warps=w, num_stages=s)
                  for bm, bn, bk, gm, w, s in [
                      (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3),
                      (32, 64, 128, 1, 4, 4), (32, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 3),
                      (64, 128, 64, 8, 4, 3), (64, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3),
                      (128, 256, 64, 8, 8, 3), (128, 128, 32, 8, 4, 4)]]
    table: dict[int, TileConfig] = {}
    for num_tokens in TUNE_TOKENS:
        x, ids, weights = problem(shape, num_tokens)
        timed = []
        for config in candidates:
            try:
                timed.append((bench(lambda: fused_moe(x, gate_up, down, ids, weights, config)),
                              config))
            except Exception as exc:  # a tile too big for this GPU's shared memory
                print(f"  skip {config}: {type(exc).__name__}", file=sys.stderr)
        table[num_tokens] = min(timed, key=lambda t: t[0])[1]
        print(f"  tuned {shape.name} T={num_tokens}: {table[num_tokens]}", file=sys.stderr)
    device = device_name(x.device)
    path = CONFIG_DIR / (config_key(shape.num_experts, shape.ffn, shape.hidden, "bfloat16",
                                    device) + ".json")
    import triton

    write_configs(path, table, f"benchmarks/kernels.py --tune on {device}, torch "
                               f"{torch.__version__}, triton {triton.__version__}, "
                               f"{datetime.date.today()}")
    return path


def run_model(shape: ExpertShape, ceil: dict[str, float], do_tune: bool) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from moeflow.ops.triton.fused_moe import dense_moe, fused_moe, fused_moe_ref

    gate_up, down = experts(shape)
    if do_tune:
        print(f"wrote {tune(shape, gate_up, down)}", file=sys.stderr)
    rows = []
    for num_tokens in (*DECODE, PREFILL):
        x, ids, weights = problem(shape, num_tokens)
        out = fused_moe(x, gate_up, down, ids, weights)
        err = None
        if num_tokens <= 64:  # the reference runs every expert on every token
            ref = fused_moe_ref(x, gate_up, down, ids, weights)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        num_hit = int(ids.unique().numel())
        floor, bound, nbytes, flops = floor_s(shape, num_tokens, num_hit, ceil)
        fused = bench(lambda: fused_moe(x, gate_up, down, ids, weights), graph=True) * 1e-3
        eager = bench(lambda: fused_moe(x, gate_up, down, ids, weights)) * 1e-3
        dense = bench(lambda: dense_moe(x, gate_up, down, ids, weights)) * 1e-3
        grouped = None
        if hasattr(F, "grouped_mm"):
            grouped = 1e3 * bench(lambda: grouped_mm_moe(x, gate_up, down, ids, weights),
                                  graph=True)
        rows.append({"model": shape.name, "tokens": num_tokens, "experts_hit": num_hit,
                     "fused_us": fused * 1e6, "fused_eager_us": eager * 1e6,
                     "dense_us": dense * 1e6, "grouped_mm_us": grouped,
                     "floor_us": floor * 1e6, "bound": bound, "fused_of_floor": floor / fused,
                     "fused_tflops": flops / fused / 1e12, "fused_gbps": nbytes / fused / 1e9,
                     "rel_err": err})
    del gate_up, down
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict[str, Any]], ceil: dict[str, float]) -> None:
    print(f"ceilings: copy {ceil['bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceil['flops_per_s'] / 1e12:.0f} TFLOP/s")
    head = (f"{'model':8} {'T':>5} {'hit':>4} {'fused us':>9} {'floor us':>9} {'bound':>5} "
            f"{'%floor':>7} {'TB/s':>6} {'TFLOP/s':>8} {'eager us':>9} {'dense us':>9} "
            f"{'gmm us':>9} {'rel err':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        grouped = "-" if r["grouped_mm_us"] is None else f"{r['grouped_mm_us']:.1f}"
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"{r['model']:8} {r['tokens']:5d} {r['experts_hit']:4d} {r['fused_us']:9.1f} "
              f"{r['floor_us']:9.1f} {r['bound']:>5} {100 * r['fused_of_floor']:6.1f}% "
              f"{r['fused_gbps'] / 1e3:6.2f} {r['fused_tflops']:8.1f} "
              f"{r['fused_eager_us']:9.1f} {r['dense_us']:9.1f} {grouped:>9} {err:>8}")
    print("fused, gmm: CUDA graph replays; eager: fused launched from Python; "
          "%floor = floor / fused")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--models", default="mixtral,qwen3",
                        help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--tune", action="store_true",
                        help="sweep tile configs and write a table for this GPU first")
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json, "--json")  # before minutes of measuring
    if not torch.cuda.is_available():
        return interpreter_check()
    ceil = ceilings()
    rows = [r for name in args.models.split(",") for r in run_model(MODELS[name], ceil,
                                                                       args.tune)]
    print_table(rows, ceil)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "ceilings": ceil, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
