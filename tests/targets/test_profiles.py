"""Profiles: the local one detects this host; bad files fail with file, field, value and expectation."""

from __future__ import annotations

import os
import platform

import pytest

from edgedeploy.errors import ProfileError
from targets.host import detect_nvidia_gpu
from targets.profiles import load_profile


def test_local_profile_detects_this_host():
    profile = load_profile("local")
    assert profile.cpu.arch == platform.machine() and profile.cpu.cores >= 1 and profile.memory_mb > 0
    assert profile.connection.transport == "local"


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="Unknown device profile") as info:
        load_profile("jetson-nanoo")
    assert "local" in info.value.expected


def test_extends_with_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: local\nname: my-box\nconnection:\n  workdir: /tmp/my-box\n")
    profile = load_profile(str(path))
    assert profile.name == "my-box" and profile.connection.workdir == "/tmp/my-box"
    assert profile.connection.transport == "local"


def test_unknown_field_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extends: local\nname: bad\nmemroy_mb: 4\n")
    with pytest.raises(ProfileError, match="memroy_mb") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("workdir", ["/opt/m; touch /tmp/x", "$(id)", "/tmp/`id`", "/a b"])
def test_shell_syntax_in_profile_values_is_rejected(tmp_path, workdir):
    path = tmp_path / "evil.yaml"
    path.write_text(f"extends: local\nname: evil\nconnection:\n  workdir: '{workdir}'\n")
    with pytest.raises(ProfileError, match="connection.workdir") as info:
        load_profile(str(path))
    assert workdir in str(info.value)


def test_a_one_word_python_is_a_command(tmp_path):
    """`python: /usr/bin/python3` used to fail with "how to fix: Input should be a valid tuple"."""
    path = tmp_path / "board.yaml"
    path.write_text("extends: x86-server\nname: board\nconnection:\n  python: /usr/bin/python3\n")
    assert load_profile(str(path)).connection.python == ("/usr/bin/python3",)
    path.write_text("extends: x86-server\nname: board\nconnection:\n  python: '/usr/bin/python3 -I'\n")
    with pytest.raises(ProfileError, match="connection.python") as refused:
        load_profile(str(path))
    assert "write connection.python as a list of words, e.g. [/usr/bin/python3, -I]" in refused.value.fix


@pytest.mark.parametrize(("text", "fix"), [
    ("cpu:\n  cores: many\n", "write a number for 'cpu.cores'"),
    ("cpu:\n  arch: riscv64\n", "write one of the values pydantic names: 'x86_64', 'aarch64' or 'armv7l'"),
    ("cpu:\n  features: avx2\n", "write 'cpu.features' as a list"),
    ("connection:\n  port: 99999\n", "write a number for 'connection.port'"),
    ("cpu:\n  int8_dot_product: maybe\n", "write true or false for 'cpu.int8_dot_product'"),
])
def test_every_validation_error_says_what_to_write(tmp_path, text, fix):
    path = tmp_path / "board.yaml"
    path.write_text(f"extends: x86-server\nname: board\n{text}")
    with pytest.raises(ProfileError) as refused:
        load_profile(str(path))
    assert refused.value.fix.startswith(fix), refused.value.fix
    assert not refused.value.fix.startswith("Input should")


def test_missing_base(tmp_path):
    path = tmp_path / "orphan.yaml"
    path.write_text("extends: no-such-board\nname: orphan\n")
    with pytest.raises(ProfileError, match="no-such-board"):
        load_profile(str(path))


def test_runtimes_declare_their_unit(tmp_path):
    nano = load_profile("jetson-nano")
    assert nano.preferred_runtime == "onnxruntime-tensorrt" and nano.preferred_scheme == "fp16"
    assert [nano.unit_of(r) for r in ("tvm", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt")] == \
        ["gpu", "cpu", "gpu", "gpu"]
    assert nano.runtimes.get("onnxruntime-tensorrt").tensorrt == "8.2.1"
    assert nano.tvm_gpu_target() == {"kind": "nvptx", "mcpu": "sm_53", "mtriple": "nvptx64-nvidia-cuda"}
    assert not nano.gpu.has_dp4a and load_profile("jetson-orin-nano").gpu.has_dp4a
    # a plain version string is a CPU runtime; onnxruntime's providers keep their unit whatever a file says
    assert load_profile("raspberry-pi-4").unit_of("tvm") == "cpu"
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("extends: jetson-nano\nname: wrong\n"
                     "runtimes: {onnxruntime-cuda: {version: '1.11.0', unit: cpu}}\n")
    with pytest.raises(ProfileError, match="runtimes"):
        load_profile(str(wrong))
    no_gpu = tmp_path / "no-gpu.yaml"
    no_gpu.write_text("extends: raspberry-pi-4\nname: no-gpu\nruntimes: {tvm: {version: '0.27.0', unit: gpu}}\n")
    with pytest.raises(ProfileError, match="no 'gpu' section"):
        load_profile(str(no_gpu))


def test_local_profile_finds_an_nvidia_gpu_through_nvidia_smi(tmp_path, monkeypatch):
    """A fake nvidia-smi first on PATH (what a GPU machine's driver installs): the local profile gets its GPU."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nif [ \"$1\" = \"--query-gpu=name,compute_cap,memory.total\" ]; then\n"
                   "  echo 'NVIDIA H100 80GB HBM3, 9.0, 81559'\nelse\n"
                   "  echo '| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0 |'\nfi\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    detect_nvidia_gpu.cache_clear()  # asked once per process: this test is another machine
    try:
        local = load_profile("local")
    finally:
        detect_nvidia_gpu.cache_clear()
    assert local.gpu is not None and local.gpu.sm == "sm_90" and local.gpu.cuda_version == "13.0"
    assert local.gpu.precisions == ("fp32", "fp16", "int8") and "H100" in local.description
    # this machine's onnxruntime is the CPU build: no GPU runtime is offered
    assert local.runtimes.get("onnxruntime-cuda") is None


def test_a_board_file_keeps_its_bases_unit_and_may_write_versions_as_numbers(tmp_path):
    """`extends: jetson-nano` + `tvm: "0.27.0"`: TVM installed there, still on the GPU; `onnxruntime: 1.11` (a YAML
    number) is a version, not a traceback."""
    mine = tmp_path / "my-nano.yaml"
    mine.write_text("extends: jetson-nano\nname: my-nano\nruntimes: {tvm: '0.27.0', onnxruntime: 1.11}\n")
    profile = load_profile(str(mine))
    assert profile.runtimes.tvm.version == "0.27.0" and profile.unit_of("tvm") == "gpu"
    assert profile.runtimes.onnxruntime.version == "1.11"
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: jetson-nano\nname: bad\nruntimes: {onnxruntime: [1, 11]}\n")
    with pytest.raises(ProfileError, match="runtimes"):
        load_profile(str(bad))


def test_the_default_scheme_is_the_profiles_where_the_runtimes_unit_has_it():
    nano = load_profile("jetson-nano")
    assert nano.default_scheme("onnxruntime-tensorrt") == "fp16"
    assert nano.default_scheme("onnxruntime") == "fp32"  # its Cortex-A57 has no fp16
    assert load_profile("raspberry-pi-4").default_scheme("tvm") == "fp32"


def test_the_runner_and_the_cli_name_the_runtimes_as_the_profiles_do():
    """The device runner and the CLI keep their own copies (the runner runs alone on a board; the CLI imports nothing
    heavy before a command): equal to the profiles' own."""
    import typing

    from edgedeploy.cli import RuntimeName as CliRuntimeName
    from targets.device_runner import GPU_PROVIDERS
    from targets.profiles import PROVIDERS, RUNTIME_NAMES

    assert GPU_PROVIDERS == PROVIDERS
    assert typing.get_args(CliRuntimeName) == RUNTIME_NAMES
