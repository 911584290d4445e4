"""The CPU worker leaves torch's process-wide state as it found it: other torch code in the
process (a user's own model beside moeflow.LLM) runs as if moeflow were not there."""

from __future__ import annotations

import pytest
import torch

from moeflow.ops import backend
from moeflow.ops import cpu as kernels
from moeflow.ops.cpu.choice import ALL_ROWS, KernelChoice
from moeflow.ops.sampling import SamplingParams
from moeflow.serve.llm import LLM

# every GEMM on torch's path (which switches the backend by rows), or every one the
# kernels take on them
CHOICES = {"torch": KernelChoice(0, 0, "test", attention=False, fp32_rows=0),
           "kernels": KernelChoice(ALL_ROWS, ALL_ROWS, "test", fp32_rows=ALL_ROWS)}


@pytest.mark.parametrize("gemms", sorted(CHOICES))
def test_the_onednn_switch_is_put_back_after_each_node(gemms, tiny_factory, monkeypatch):
    if gemms == "kernels" and not kernels.available():
        pytest.skip("no CPU kernels here")
    monkeypatch.setattr("moeflow.ops.cpu.choice._override", [CHOICES[gemms]])
    path = tiny_factory("qwen3_moe")
    chosen: list[bool] = []
    real = backend.use_onednn

    def recorded(want: bool) -> None:
        chosen.append(want)
        real(want)

    monkeypatch.setattr(backend, "use_onednn", recorded)
    was = torch._C._get_mkldnn_enabled()
    try:
        with LLM(path, devices="cpu:0") as llm:
            for found in (True, False):
                torch._C._set_mkldnn_enabled(found)
                chosen.clear()
                llm.generate([list(range(3, 40))], sampling=SamplingParams(
                    max_new_tokens=4, ignore_eos=True))
                assert torch._C._get_mkldnn_enabled() == found
            # the 37-row prefill's GEMMs did switch oneDNN on, and it was put back off
            assert True in chosen
    finally:
        torch._C._set_mkldnn_enabled(was)
