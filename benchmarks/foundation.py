"""moeflow against transformers on one CPU, side by side in one run.

A checkpoint of Qwen3-MoE shape (hidden 1024, 12 layers, 64 experts, top-8, expert FFN 384,
16 query / 4 KV heads of 64, vocab 32000) in bf16 is built locally if missing. Both
engines load it from disk and run greedy generation through their public APIs:

    prefill     tokens/s to the first token of a 512-token prompt
    decode      tokens/s at batch 1 and batch 16 (64 new tokens after a 16-token prompt)
    roofline    batch-1 decode against bytes of active weights per token / measured memory
                read bandwidth (a streaming read of 1 GiB), and against the bandwidth a
                single large bf16 GEMV reaches on this machine

Every figure is the median of --repeats runs; ratios are moeflow / transformers.

    python benchmarks/foundation.py [--json out.json] [--repeats 3] [--devices cpu:0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moeflow.models.families import load_spec
from moeflow.models.tiny import TinyShape, make_tiny
from moeflow.serve.llm import LLM
from moeflow.ops.sampling import SamplingParams

CHECKPOINT = Path(".cache/bench-qwen3-moe")
SHAPE = TinyShape(layers=12, experts=64, top_k=8, hidden=1024, heads=16, kv_heads=4,
                  head_dim=64, intermediate=384, dense_intermediate=1024, vocab=32000,
                  max_positions=4096)
PREFILL_LEN, DECODE_PROMPT, DECODE_NEW, BATCH = 512, 16, 64, 16


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth() -> float:
    """Bytes/s of a streaming read of a 1 GiB buffer (best of 3)."""
    buf = torch.ones(1 << 29, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 2 / (time.perf_counter() - start))
    return best


def gemv_bandwidth() -> float:
    """Bytes/s one large bf16 matrix-vector product streams (best of the CPU backends)."""
    w = torch.ones(16384, 16384, dtype=torch.bfloat16)
    x = torch.ones(1, 16384, dtype=torch.bfloat16)
    best = 0.0
    for onednn in (True, False):
        torch._C._set_mkldnn_enabled(onednn)
        for _ in range(3):
            start = time.perf_counter()
            x @ w.T
            best = max(best, w.numel() * 2 / (time.perf_counter() - start))
    torch._C._set_mkldnn_enabled(True)
    return best


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def bench_moeflow(path: Path, devices: str, repeats: int) -> dict[str, float]:
    llm = LLM(path, devices=devices)
    vocab = llm.spec.vocab_size
    [long_prompt] = prompts(1, PREFILL_LEN, vocab)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    prefill = median_time(lambda: llm.generate(long_prompt, sampling=one), repeats)

    def decode(batch: int) -> float:
        ps = prompts(batch, DECODE_PROMPT, vocab)
        params = SamplingParams(max_new_tokens=DECODE_NEW + 1, ignore_eos=True)
        rates = []
        for _ in range(repeats + 1):
            outs = llm.generate(ps, sampling=params)
            span = max(o.e2e_s for o in outs) - max(o.ttft_s for o in outs)
            rates.append(batch * DECODE_NEW / span)
        return statistics.median(rates[1:])

    return {"prefill_tok_s": PREFILL_LEN / prefill, "decode_bs1_tok_s": decode(1),
            f"decode_bs{BATCH}_tok_s": decode(BATCH)}


def bench_transformers(path: Path, repeats: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def generate(ids: torch.Tensor, new: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)

    long_prompt = torch.tensor(prompts(1, PREFILL_LEN, vocab))
    prefill = median_time(lambda: generate(long_prompt, 1), repeats)

    def decode(batch: int) -> float:
        ids = torch.tensor(prompts(batch, DECODE_PROMPT, vocab))
        full = median_time(lambda: generate(ids, DECODE_NEW + 1), repeats)
        first = median_time(lambda: generate(ids, 1), repeats)
        return batch * DECODE_NEW / (full - first)

    return {"prefill_tok_s": PREFILL_LEN / prefill, "decode_bs1_tok_s": decode(1),
            f"decode_bs{BATCH}_tok_s": decode(BATCH)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="cpu:0")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    if not (args.checkpoint / "config.json").exists():
        print(f"building the benchmark checkpoint in {args.checkpoint} ...", file=sys.stderr)
        make_tiny("qwen3_moe", args.checkpoint, SHAPE, dtype="bfloat16", seed=0)
    spec = load_spec(args.checkpoint)
    bytes_per_token = spec.active_params_per_token() * spec.dtype_bytes

    print("measuring memory bandwidth ...", file=sys.stderr)
    bandwidth, gemv = read_bandwidth(), gemv_bandwidth()
    print("running moeflow ...", file=sys.stderr)
    ours = bench_moeflow(args.checkpoint, args.devices, args.repeats)
    print("running transformers ...", file=sys.stderr)
    theirs = bench_transformers(args.checkpoint, args.repeats)

    roofline = bandwidth / bytes_per_token
    rows = [(k, ours[k], theirs[k], ours[k] / theirs[k]) for k in ours]
    print(f"\nQwen3-MoE shape, bf16, {torch.get_num_threads()} threads, moeflow devices "
          f"{args.devices}; active weights {bytes_per_token / 1e6:.0f} MB/token")
    print(f"{'metric':22s} {'moeflow':>10s} {'transformers':>13s} {'ratio':>7s}")
    for name, a, b, r in rows:
        print(f"{name:22s} {a:10.1f} {b:13.1f} {r:6.2f}x")
    frac = ours["decode_bs1_tok_s"] / roofline
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 roofline "
          f"{roofline:.1f} tok/s; moeflow reaches {frac:.0%} "
          f"(transformers {theirs['decode_bs1_tok_s'] / roofline:.0%})")
    print(f"largest bf16 GEMV streams {gemv / 1e9:.1f} GB/s -> {gemv / bytes_per_token:.1f} "
          f"tok/s; moeflow reaches {ours['decode_bs1_tok_s'] / (gemv / bytes_per_token):.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "moeflow": ours, "transformers": theirs,
            "ratio": {k: r for k, _, _, r in rows},
            "read_bandwidth_gb_s": bandwidth / 1e9, "gemv_bandwidth_gb_s": gemv / 1e9,
            "active_bytes_per_token": bytes_per_token, "roofline_tok_s": roofline,
            "decode_bs1_roofline_fraction": frac}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
