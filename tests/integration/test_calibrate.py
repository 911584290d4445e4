"""`moeflow calibrate` measures this CPU into a hardware file the simulator takes."""

from __future__ import annotations

from moeflow.cli import main as cli_main
from moeflow.sim import hardware


def test_calibrate_writes_a_usable_hardware_file(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert cli_main(["calibrate", "--quick", "--out", str(out)]) == 0
    hw = hardware.load(str(out))
    d = hw.device
    assert d.kind == "cpu" and hw.num_devices == 1
    assert d.peak_flops["bfloat16"] > 1e9 and d.peak_flops["float32"] > 1e9
    assert d.mem_bandwidth > 1e8 and d.activation_bandwidth > 1e8
    assert 0 < d.launch_overhead < 1e-3 and d.gemm_half_rows > 0
    assert "GFLOP/s" in capsys.readouterr().out
    assert cli_main(["simulate", "--model", "olmoe-1b-7b", "--hardware", str(out),
                     "--workload", "burst", "--num-requests", "1", "--prompt-len", "fixed:8",
                     "--output-len", "fixed:2"]) == 0


def test_calibrate_says_what_to_measure(capsys):
    assert cli_main(["calibrate"]) == 2
    assert "say what to calibrate: --out FILE" in capsys.readouterr().err


def test_calibrate_kernels_as_the_readme_gives_it(tmp_path, monkeypatch, capsys):
    """`moeflow calibrate --kernels` (--quick): writes the crossovers for this CPU."""
    import json

    from moeflow.ops import cpu
    from moeflow.ops.cpu import choice
    from moeflow.ops.cpu.calibrate import EXPERT_ROWS

    if not cpu.available():
        assert cli_main(["calibrate", "--kernels"]) == 2  # says why, not a traceback
        return
    monkeypatch.setenv("MOEFLOW_KERNEL_CACHE", str(tmp_path))  # leaves this CPU's choice be
    try:
        assert cli_main(["calibrate", "--kernels", "--quick"]) == 0
        body = json.loads((tmp_path / "choice.json").read_text())
        assert body["cpu"] == choice.cpu_name() and body["table"]["experts"]["rows"] == list(EXPERT_ROWS)
        assert f"wrote {tmp_path / 'choice.json'}" in capsys.readouterr().out
    finally:
        choice._measured_choice.cache_clear()
