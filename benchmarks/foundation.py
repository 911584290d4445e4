"""moeflow against transformers (and llama.cpp) on one CPU, side by side in one run.

A checkpoint of Qwen3-MoE shape (hidden 1024, 12 layers, 64 experts, top-8, expert FFN 384,
16 query / 4 KV heads of 64, vocab 32000) in bf16 is built locally if missing. Both
engines load it from disk and run greedy generation through their public APIs:

    prefill     tokens/s to the first token of a 512-token prompt
    decode      tokens/s at batch 1 and batch 16 (64 new tokens after a 16-token prompt)
    roofline    batch-1 decode against bytes of active weights per token / measured memory
                read bandwidth (a streaming read of 1 GiB), and against the bandwidth a
                single large bf16 GEMV reaches on this machine

With --llama-cpp DIR (the folder benchmarks/llama_cpp.py builds and prints: llama.cpp's
tools and a bf16 GGUF of the same checkpoint), llama.cpp is a third column for the same
three figures, run with as many threads (-t) as moeflow's torch uses: prefill and batch-1
decode are llama-bench's pp512 and tg64 (tg64 starts from an empty context, not after a
16-token prompt), batch-16 decode is llama-batched-bench's S_TG for 16 sequences of
16 prompt + 64 new tokens. Random token ids for all engines.

Every figure is the median of --repeats rounds after one warm-up round; each round runs
the engines one after the other, so a drift of the machine hits all alike. Each engine runs
in a process of its own (moeflow and transformers in a child each, llama.cpp's tools as
they are): on the 2-core VM moeflow in a process that also held another engine's 4 GB of
weights decoded about a quarter slower (44-53 tok/s at batch 1 against 61-68). Ratios are
moeflow / transformers and moeflow / llama.cpp.

    python benchmarks/foundation.py [--json out.json] [--repeats 3] [--devices cpu:0]
                                    [--llama-cpp .cache/llama-cpp/build/bin]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
LLAMA_TOOLS = ("llama-bench", "llama-batched-bench")  # built by benchmarks/llama_cpp.py
Sample = dict[str, float]  # one measurement of each figure, tokens/s


def ensure_checkpoint(path: Path) -> None:
    if not (path / "config.json").exists():
        print(f"building the benchmark checkpoint in {path} ...", file=sys.stderr)
        make_tiny("qwen3_moe", path, SHAPE, dtype="bfloat16", seed=0)


def gguf_path(llama_dir: Path, checkpoint: Path) -> Path:
    """Where benchmarks/llama_cpp.py puts the checkpoint's bf16 GGUF."""
    return llama_dir / f"{checkpoint.resolve().name}-bf16.gguf"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def moeflow_sampler(path: Path, devices: str) -> Callable[[], Sample]:
    llm = LLM(path, devices=devices)
    vocab = llm.spec.vocab_size
    [long_prompt] = prompts(1, PREFILL_LEN, vocab)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    params = SamplingParams(max_new_tokens=DECODE_NEW + 1, ignore_eos=True)

    def decode(batch: int) -> float:
        outs = llm.generate(prompts(batch, DECODE_PROMPT, vocab), sampling=params)
        return batch * DECODE_NEW / (max(o.e2e_s for o in outs) - max(o.ttft_s for o in outs))

    return lambda: {
        "prefill_tok_s": PREFILL_LEN / timed(lambda: llm.generate(long_prompt, sampling=one)),
        "decode_bs1_tok_s": decode(1), f"decode_bs{BATCH}_tok_s": decode(BATCH)}


def transformers_sampler(path: Path) -> Callable[[], Sample]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def generate(ids: torch.Tensor, new: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)

    long_prompt = torch.tensor(prompts(1, PREFILL_LEN, vocab))

    def decode(batch: int) -> float:
        ids = torch.tensor(prompts(batch, DECODE_PROMPT, vocab))
        full, first = timed(lambda: generate(ids, DECODE_NEW + 1)), timed(lambda: generate(ids, 1))
        return batch * DECODE_NEW / (full - first)

    return lambda: {"prefill_tok_s": PREFILL_LEN / timed(lambda: generate(long_prompt, 1)),
                    "decode_bs1_tok_s": decode(1), f"decode_bs{BATCH}_tok_s": decode(BATCH)}


def run_tool(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout


def llama_bench_rates(stdout: str) -> tuple[float, float]:
    """(prefill, decode) tokens/s from `llama-bench -o json` of one pp and one tg test."""
    tests = json.loads(stdout)
    [pp] = [t for t in tests if t["n_prompt"] == PREFILL_LEN and t["n_gen"] == 0]
    [tg] = [t for t in tests if t["n_prompt"] == 0 and t["n_gen"] == DECODE_NEW]
    return float(pp["avg_ts"]), float(tg["avg_ts"])


def batched_bench_rate(stdout: str) -> float:
    """Batch-16 decode tokens/s from `llama-batched-bench --output-format jsonl`."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    [row] = [r for r in rows if r.get("pl") == BATCH and r.get("tg") == DECODE_NEW]
    return float(row["speed_tg"])


def llama_cpp_sampler(llama_dir: Path, checkpoint: Path, threads: int) -> Callable[[], Sample]:
    model = gguf_path(llama_dir, checkpoint)
    missing = [p for p in (model, *(llama_dir / t for t in LLAMA_TOOLS)) if not p.exists()]
    if missing:
        sys.exit(f"--llama-cpp {llama_dir}: no {', '.join(map(str, missing))}; "
                 f"run python benchmarks/llama_cpp.py --checkpoint {checkpoint}")
    # -lm none: weights read into memory, not mapped: this VM's proactive reclaim (kdamond)
    # drops a mapped file's cold pages, and experts would be read from disk mid-run
    common = ["-m", str(model), "-t", str(threads), "-lm", "none"]
    bench = [str(llama_dir / "llama-bench"), *common, "-p", str(PREFILL_LEN),
             "-n", str(DECODE_NEW), "-r", "1", "-o", "json"]
    batched = [str(llama_dir / "llama-batched-bench"), *common, "-c", "2048",  # >= 16 x 80
               "-npp", str(DECODE_PROMPT), "-ntg", str(DECODE_NEW), "-npl", str(BATCH),
               "--output-format", "jsonl"]

    def sample() -> Sample:
        prefill, decode = llama_bench_rates(run_tool(bench))
        return {"prefill_tok_s": prefill, "decode_bs1_tok_s": decode,
                f"decode_bs{BATCH}_tok_s": batched_bench_rate(run_tool(batched))}

    return sample


SAMPLERS: dict[str, Callable[[Path, str], Callable[[], Sample]]] = {
    "moeflow": moeflow_sampler,
    "transformers": lambda path, devices: transformers_sampler(path),
}


def sampler_command(engine: str, checkpoint: Path, devices: str, threads: int) -> list[str]:
    return [sys.executable, __file__, "--sampler", engine, "--checkpoint", str(checkpoint),
            "--devices", devices, "--threads", str(threads)]


def in_own_process(engine: str, command: list[str]
                   ) -> tuple[Callable[[], Sample], subprocess.Popen[str]]:
    """`engine`'s sampler in the child process `command` starts (`sampler_command`, which
    runs `serve_sampler`), loaded once; each call runs one sample there. Close the child's
    stdin to end it."""
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    def reply() -> str:
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the {engine} process exited with {child.wait()}")
        return line

    if reply().strip() != "ready":
        raise RuntimeError(f"the {engine} process did not start")

    def sample() -> Sample:
        stdin.write("sample\n")
        stdin.flush()
        return {k: float(v) for k, v in json.loads(reply()).items()}

    return sample, child


def serve_sampler(engine: str, checkpoint: Path, devices: str) -> int:
    """The child of `in_own_process`: "ready", then a JSON sample for each line read, on
    this process's own stdout (whatever the engines print goes to stderr)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sample = SAMPLERS[engine](checkpoint, devices)
    print("ready", file=replies, flush=True)
    for _ in sys.stdin:
        print(json.dumps(sample()), file=replies, flush=True)
    return 0


def interleaved(samplers: dict[str, Callable[[], Sample]], repeats: int
                ) -> dict[str, Sample]:
    """Per engine, each figure's median over `repeats` rounds, after one warm-up round;
    each round runs every engine once, in turn."""
    runs: dict[str, list[Sample]] = {name: [] for name in samplers}
    for round_ in range(repeats + 1):
        for name, sample in samplers.items():
            print(f"  {f'round {round_}/{repeats}' if round_ else 'warm-up'}: {name}",
                  file=sys.stderr)
            got = sample()
            if round_:
                runs[name].append(got)
    return {name: {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            for name, samples in runs.items()}


def bench_moeflow(path: Path, devices: str, repeats: int) -> Sample:
    """moeflow's figures alone (for benchmarks/calibration.py)."""
    return interleaved({"moeflow": moeflow_sampler(path, devices)}, repeats)["moeflow"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="cpu:0")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--llama-cpp", type=Path, metavar="DIR",
                        help="also run llama.cpp: the folder that benchmarks/llama_cpp.py "
                        "prints (its tools and the checkpoint's GGUF)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json, "--json")  # before minutes of measuring
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), 2))
    threads = torch.get_num_threads()
    if args.sampler:  # a child of in_own_process
        return serve_sampler(args.sampler, args.checkpoint, args.devices)

    ensure_checkpoint(args.checkpoint)
    llama = llama_cpp_sampler(args.llama_cpp, args.checkpoint, threads) if args.llama_cpp \
        else None  # its files checked before the long steps
    spec = load_spec(args.checkpoint)
    bytes_per_token = spec.active_params_per_token() * spec.dtype_bytes

    print("measuring memory bandwidth ...", file=sys.stderr)
    bandwidth, gemv = read_bandwidth(), gemv_bandwidth()
    print("loading the engines, each in a process of its own ...", file=sys.stderr)
    samplers: dict[str, Callable[[], Sample]] = {}
    children = []
    try:
        for engine in SAMPLERS:
            samplers[engine], child = in_own_process(engine, sampler_command(
                engine, args.checkpoint, args.devices, threads))
            children.append(child)
        if llama:
            samplers["llama.cpp"] = llama
        print(f"running them in turn, {args.repeats} rounds ...", file=sys.stderr)
        results = interleaved(samplers, args.repeats)
    finally:
        for child in children:
            child.stdin.close()  # type: ignore[union-attr]
            child.wait()
    ours, others = results["moeflow"], [name for name in results if name != "moeflow"]
    ratios = {name: {k: ours[k] / results[name][k] for k in ours} for name in others}

    roofline = bandwidth / bytes_per_token
    print(f"\nQwen3-MoE shape, bf16, {threads} threads, moeflow devices "
          f"{args.devices}; active weights {bytes_per_token / 1e6:.0f} MB/token")
    print(f"{'metric':22s} {'moeflow':>10s}" + "".join(f" {n:>13s}" for n in others)
          + "".join(f" {'vs ' + n:>16s}" for n in others))
    for k in ours:
        print(f"{k:22s} {ours[k]:10.1f}" + "".join(f" {results[n][k]:13.1f}" for n in others)
              + "".join(f" {ratios[n][k]:15.2f}x" for n in others))
    frac = ours["decode_bs1_tok_s"] / roofline
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 roofline "
          f"{roofline:.1f} tok/s; moeflow reaches {frac:.0%} ("
          + ", ".join(f"{n} {results[n]['decode_bs1_tok_s'] / roofline:.0%}" for n in others)
          + ")")
    print(f"largest bf16 GEMV streams {gemv / 1e9:.1f} GB/s -> {gemv / bytes_per_token:.1f} "
          f"tok/s; moeflow reaches {ours['decode_bs1_tok_s'] / (gemv / bytes_per_token):.0%}")
    if args.json:
        extra = {"ratio_llama_cpp": ratios["llama.cpp"]} if "llama.cpp" in ratios else {}
        Path(args.json).write_text(json.dumps({
            **results, "ratio": ratios["transformers"], **extra, "threads": threads,
            "read_bandwidth_gb_s": bandwidth / 1e9, "gemv_bandwidth_gb_s": gemv / 1e9,
            "active_bytes_per_token": bytes_per_token, "roofline_tok_s": roofline,
            "decode_bs1_roofline_fraction": frac}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
