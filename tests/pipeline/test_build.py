"""Every profile compiles a reference workload, on this machine, to a library of the device's architecture."""

from __future__ import annotations

import json

import pytest

from pipeline.compile import build
from pipeline.compiler.build import ELF_MACHINES, elf_machine
from pipeline.config import RunConfig
from pipeline.workloads import WORKLOADS
from targets.profiles import available_profiles, load_profile


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_compiles_the_digits_cnn(name, tmp_path):
    profile = load_profile(name)
    config = RunConfig(model_path=str(WORKLOADS["digits-cnn"].model_path()), profile=name)
    result = build(config, profile, tmp_path)
    assert elf_machine(result.artifact.library_path) == ELF_MACHINES[profile.cpu.arch]
    manifest = json.loads(open(result.artifact.manifest_path).read())
    assert manifest["profile"]["name"] == name and manifest["elf_machine"] == ELF_MACHINES[profile.cpu.arch]
    if profile.tvm_gpu_target():
        sm = profile.gpu.sm
        assert manifest["gpu_target"] == {"kind": "nvptx", "mcpu": sm, "mtriple": "nvptx64-nvidia-cuda"}
        # never CUDA C source: PTX a JetPack 4.6 driver JITs (ISA <= 6.5) and the cubin for the exact SM
        assert manifest["device_code"] == "ptx+cubin"
        code = manifest["gpu_code"]
        assert code["sm"] == sm and code["kernels"] > 0 and tuple(map(int, code["ptx_isa"].split("."))) <= (6, 5) \
            or sm != "sm_53"
        assert {(e["kind"], e["arch"]) for e in code["fatbin"]} == {("ptx", int(sm[3:])), ("cubin", int(sm[3:]))}
    else:
        assert manifest["device_code"] == "cpu" and manifest["target"]["mtriple"] == profile.cpu.triple
        # every kernel of a CPU build has a default schedule, vectors as wide as the profile's CPU has
        schedules = manifest["schedules"]
        assert schedules["default_scheduled"] == schedules["kernels"] > 0
        assert schedules["vector_lanes"] == (16 if "avx512f" in profile.cpu.features else 8
                                             if profile.cpu.arch == "x86_64" else 4)
