"""Build llama.cpp and a GGUF of the foundation benchmark's checkpoint, for its third column.

llama.cpp comes from the package index as the sdist of llama-cpp-python, which vendors it
(vendor/llama.cpp); nothing else is downloaded. Each step is skipped when its result exists:

    download    pip download --no-binary :all: --no-deps llama-cpp-python==VERSION
    extract     the sdist into <out>/llama_cpp_python-VERSION
    build       cmake, CPU only (-march=native), Release, static; no OpenSSL (llama.cpp
                has dropped curl), no server nor its web UI (whose build downloads one):
                only llama-bench and llama-batched-bench, -j2, into <out>/build
    convert     the checkpoint (built as benchmarks/foundation.py builds it, if missing) to
                a bf16 GGUF with the vendored convert_hf_to_gguf.py and gguf-py, into the
                folder that holds the binaries

The converter names a BPE tokenizer's pre-tokenizer by hashing the ids it gives a fixed
text, and refuses a hash it does not know, as our locally trained tokenizer's is. We run it
in this process with that lookup (TextModel.get_vocab_base_pre) replaced by the name of the
llama.cpp pre-tokenizer whose regex our tokenizer.json uses: a byte-level pre-tokenizer
with use_regex is GPT-2's regex, llama.cpp's "gpt-2". Any other pre-tokenizer is refused.
The benchmark feeds token ids, so this only labels the GGUF's vocabulary correctly.

At the end it prints the folder to pass to benchmarks/foundation.py --llama-cpp.

    python benchmarks/llama_cpp.py [--out .cache/llama-cpp] [--checkpoint .cache/bench-qwen3-moe]
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from foundation import CHECKPOINT, LLAMA_TOOLS, ensure_checkpoint, gguf_path  # noqa: E402

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is what gets built
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_RPC=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]


class SetupError(RuntimeError):
    pass


def step(name: str, done: bool) -> bool:
    """Print the step's progress line; True if it still has to run."""
    print(f"[llama.cpp] {name}: {'done already' if done else 'running ...'}", flush=True)
    return not done


def run(cmd: list[str]) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SetupError(f"failed: {' '.join(cmd)}")


def check_toolchain() -> None:
    missing = [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]
    if missing:
        raise SetupError(f"{', '.join(missing)} not found: install cmake and a C/C++ "
                         "compiler (Debian: apt-get install cmake build-essential)")


def pre_tokenizer(checkpoint: Path) -> str:
    """The llama.cpp pre-tokenizer name whose regex the checkpoint's tokenizer.json uses."""
    pre = json.loads((checkpoint / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise SetupError(f"{checkpoint}/tokenizer.json: pre-tokenizer {pre} has no known "
                     "llama.cpp name here; add it to pre_tokenizer()")


def convert(src: Path, checkpoint: Path, out: Path) -> None:
    """The vendored convert_hf_to_gguf.py, in this process, with the pre-tokenizer named."""
    name = pre_tokenizer(checkpoint)
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.base import TextModel  # the vendored converter's package

    TextModel.get_vocab_base_pre = lambda self, tokenizer: name  # type: ignore[method-assign]
    script = src / "convert_hf_to_gguf.py"
    partial = out.with_suffix(".partial")  # renamed when whole, so a rerun redoes a cut one
    sys.argv = [str(script), str(checkpoint), "--outtype", "bf16", "--outfile", str(partial)]
    runpy.run_path(str(script), run_name="__main__")
    if not partial.exists():
        raise SetupError(f"the converter wrote no {partial}")
    partial.rename(out)


def setup(out: Path, checkpoint: Path) -> Path:
    """Everything above; returns the folder holding the binaries and the GGUF."""
    out.mkdir(parents=True, exist_ok=True)
    sdist = out / f"llama_cpp_python-{VERSION}.tar.gz"
    src = out / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    build = out / "build"
    bin_dir = build / "bin"

    if step(f"download llama-cpp-python {VERSION} sdist", sdist.exists()):
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={VERSION}", "-d", str(out)])
    if step("extract", (src / "CMakeLists.txt").exists()):
        with tarfile.open(sdist) as tar:
            tar.extractall(out, filter="data")
    if step("configure (cmake)", (build / "CMakeCache.txt").exists()):
        check_toolchain()
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        run(["cmake", "-S", str(src), "-B", str(build), *gen, *CMAKE_FLAGS])
    if step(f"build {', '.join(LLAMA_TOOLS)} (-j2; long on 2 cores)",
            all((bin_dir / t).exists() for t in LLAMA_TOOLS)):
        run(["cmake", "--build", str(build), "--target", *LLAMA_TOOLS, "-j", "2"])
    ensure_checkpoint(checkpoint)
    gguf = gguf_path(bin_dir, checkpoint)
    if step(f"convert {checkpoint} to {gguf.name}", gguf.exists()):
        convert(src, checkpoint, gguf)
    return bin_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/llama-cpp"))
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    try:
        bin_dir = setup(args.out, args.checkpoint)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\nready: python benchmarks/foundation.py --llama-cpp {bin_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
