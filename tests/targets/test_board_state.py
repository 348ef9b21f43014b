"""The board-state probe, run as it runs on a board (a separate Python process) against fake sysfs trees and fake
Jetson / Raspberry Pi tools on PATH; and the marks ``judge`` draws from two snapshots."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from targets.board_state import PROBE, BoardState, judge, read_board_state
from targets.transport import LocalTransport

PY36 = Path("/root/.pyenv/versions/3.6.15/bin/python")

NANO_ZONES = {"AO-therm": 38500, "CPU-therm": 41000, "GPU-therm": 39500, "PLL-therm": 37000, "PMIC-Die": 100000,
              "thermal-fan-est": 40000}
# jetson_clocks --show as root on a Nano (JetPack 4.6), cut to the lines the probe reads and one it must skip.
NANO_CLOCKS_SHOWN = """SOC family:tegra210  Machine:NVIDIA Jetson Nano Developer Kit
Online CPUs: 0-3
cpu0: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1479000 CurrentFreq=1224000 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1479000 CurrentFreq=1224000 IdleStates: WFI=1 c7=1
GPU MinFreq=76800000 MaxFreq=921600000 CurrentFreq=76800000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=0
Fan: PWM=0
NV Power Mode: 5W"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    write(bin_dir / name, "#!/bin/sh\n" + script)
    (bin_dir / name).chmod(0o755)


def fake_cpus(root: Path, governor: str, cur_khz: int, max_khz: int, cores: int = 4) -> None:
    for core in range(cores):
        freq = root / f"sys/devices/system/cpu/cpu{core}/cpufreq"
        write(freq / "scaling_governor", governor)
        write(freq / "scaling_cur_freq", str(cur_khz))
        write(freq / "cpuinfo_max_freq", str(max_khz))
        write(freq / "scaling_max_freq", str(max_khz))
        if core:  # cpu0 has no online switch
            write(freq.parent / "online", "1")


def fake_zones(root: Path, zones: dict[str, int]) -> None:
    for number, (kind, millidegrees) in enumerate(zones.items()):
        write(root / f"sys/class/thermal/thermal_zone{number}/type", kind)
        write(root / f"sys/class/thermal/thermal_zone{number}/temp", str(millidegrees))


@pytest.fixture
def board(tmp_path, monkeypatch):
    """An empty fake board: its sysfs root and a PATH holding only its own tools (none of this machine's)."""
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    root.mkdir()
    bin_dir.mkdir()
    monkeypatch.setenv("EDGEDEPLOY_SYSFS_ROOT", str(root))
    monkeypatch.setenv("PATH", str(bin_dir))
    return root, bin_dir


@pytest.fixture
def nano(board):
    """A Jetson Nano in its 5 W mode, not root: schedutil on 4 cores below max, an idle GPU, six thermal zones."""
    root, bin_dir = board
    fake_cpus(root, "schedutil", cur_khz=921600, max_khz=1479000)
    gpu = root / "sys/devices/gpu.0/devfreq/57000000.gpu"
    write(gpu / "cur_freq", "76800000")
    write(gpu / "max_freq", "921600000")
    fake_zones(root, NANO_ZONES)
    fake_tool(bin_dir, "nvpmodel", "echo 'NVPM WARN: fan mode is not set!' >&2\necho 'NV Power Mode: 5W'\necho 1\n")
    fake_tool(bin_dir, "jetson_clocks", "echo 'ERROR: You must be root to run this script' >&2\nexit 1\n")
    return root, bin_dir


def probe_json() -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_probe_is_python36_grammar():
    ast.parse(PROBE, feature_version=(3, 6))


def test_jetson_nano(nano):
    state = read_board_state(LocalTransport(), [sys.executable])
    assert (state.power_mode, state.power_mode_id) == ("5W", 1)
    assert state.cpu_governors == dict.fromkeys(range(4), "schedutil")
    assert state.cpu_freq_khz == dict.fromkeys(range(4), 921600)
    assert state.cpu_max_khz == dict.fromkeys(range(4), 1479000)
    assert (state.gpu_freq_hz, state.gpu_max_hz) == (76_800_000, 921_600_000)
    assert state.temperatures_c["CPU-therm"] == 41.0 and len(state.temperatures_c) == 6
    assert state.throttled is None and state.arm_clock_hz is None and state.emc_freq_hz is None
    assert state.raw["jetson_clocks"] == "unknown"  # not root
    assert state.raw["gpu_devfreq"] == "57000000.gpu"
    marks = judge(state, state)
    assert "CPU governor schedutil on cores 0-3 (not performance): clocks may vary" in marks
    assert "power mode 5W (not MAXN)" in marks
    # an idle snapshot under schedutil is below the maximum anyway: the governor's mark says it, no clock mark
    assert not [mark for mark in marks if mark.startswith("CPU at")]
    assert "GPU below its maximum clock after the run: 0.08 of 0.92 GHz" in marks


def test_jetson_clocks_as_root_fills_what_sysfs_lacks(board):
    root, bin_dir = board
    fake_tool(bin_dir, "jetson_clocks", f"/bin/cat <<'EOF'\n{NANO_CLOCKS_SHOWN}\nEOF\n")
    fake_cpus(root, "schedutil", cur_khz=1479000, max_khz=1479000, cores=1)  # sysfs wins where it has a core
    state = read_board_state(LocalTransport(), [sys.executable])
    assert state.cpu_freq_khz == {0: 1479000, 1: 1224000}
    assert (state.gpu_freq_hz, state.gpu_max_hz) == (76_800_000, 921_600_000)
    assert (state.emc_freq_hz, state.emc_max_hz) == (1_600_000_000, 1_600_000_000)
    assert "NV Power Mode: 5W" in state.raw["jetson_clocks"]


def test_parked_cores_are_left_out(nano):
    root, _ = nano
    write(root / "sys/devices/system/cpu/cpu3/online", "0")  # 5 W modes park cores; their cpufreq files go stale
    assert sorted(read_board_state(LocalTransport(), [sys.executable]).cpu_freq_khz) == [0, 1, 2]


def test_raspberry_pi(board):
    root, bin_dir = board
    fake_cpus(root, "ondemand", cur_khz=1500000, max_khz=1500000)
    fake_zones(root, {"cpu-thermal": 62300})
    fake_tool(bin_dir, "vcgencmd", 'case "$1" in\n  get_throttled) echo throttled=0x50005 ;;\n'
                                   '  measure_clock) echo "frequency(48)=600117184" ;;\nesac\n')
    state = read_board_state(LocalTransport(), [sys.executable])
    on = sorted(flag for flag, set_ in state.throttled.items() if set_)
    assert on == ["throttled now", "throttling occurred", "under-voltage now", "under-voltage occurred"]
    assert state.arm_clock_hz == 600_117_184 and state.temperatures_c == {"cpu-thermal": 62.3}
    assert state.power_mode is None and "jetson_clocks" not in state.raw
    marks = judge(state, state)
    assert "throttled during the run (vcgencmd: throttled now, under-voltage now)" in marks
    assert "throttled before the run (vcgencmd: throttled now, under-voltage now)" in marks
    assert not [mark for mark in marks if mark.startswith("ARM")]  # ondemand: idle clocks say nothing
    pinned = state.model_copy(update={"cpu_governors": dict.fromkeys(state.cpu_governors, "performance")})
    assert "ARM (vcgencmd) below its maximum clock before the run: 0.60 of 1.50 GHz" in judge(pinned, pinned)


def test_a_hung_tool_costs_seconds_not_the_probe(board):
    root, bin_dir = board
    fake_zones(root, {"cpu-thermal": 50000})
    fake_tool(bin_dir, "vcgencmd", "/bin/sleep 60\n")  # its child holds the pipe too: the whole group must go
    probed = probe_json()
    assert probed["vcgencmd"] is None and probed["thermal"] == {"cpu-thermal": 50000}


def test_nothing_there_is_all_null(board):
    assert probe_json() == dict.fromkeys(["nvpmodel", "jetson_clocks", "cpus", "gpu", "thermal", "vcgencmd"])


def test_this_machines_real_sys(monkeypatch):
    monkeypatch.delenv("EDGEDEPLOY_SYSFS_ROOT", raising=False)
    assert set(probe_json()) == {"nvpmodel", "jetson_clocks", "cpus", "gpu", "thermal", "vcgencmd"}  # exit 0, JSON
    state = read_board_state(LocalTransport(), [sys.executable])  # whatever this machine has
    assert all(isinstance(mark, str) for mark in judge(state, state))


@pytest.mark.skipif(not PY36.exists(), reason="no Python 3.6 interpreter on this machine")
def test_probe_runs_under_a_real_python36(nano):
    state = read_board_state(LocalTransport(), [str(PY36)])
    assert state.power_mode == "5W" and state.gpu_max_hz == 921_600_000 and len(state.cpu_governors) == 4


@pytest.mark.parametrize("python_argv", [
    [sys.executable, "-c", "print('not json')", "--"],  # PROBE then goes to sys.argv, unrun
    [sys.executable, "-c", "print('[1, 2]')", "--"],
    ["/bin/false"],
    ["/nonexistent/python3"],
])
def test_a_failing_device_python_gives_an_unknown_state(python_argv):
    assert read_board_state(LocalTransport(), python_argv) == BoardState()


def test_malformed_probe_output_is_left_unknown():
    state = BoardState.from_probe({"nvpmodel": "MAXN", "cpus": {"x": {"cur": 1}}, "gpu": [1], "thermal": {"a": "hot"},
                                   "vcgencmd": {"throttled": "0xZZ", "raw": "throttled=0xZZ"}})
    assert state.power_mode is None and not state.cpu_freq_khz and state.throttled is None
    implausible = BoardState.from_probe({"thermal": {"CV0-therm": -256000, "CPU-therm": 45500}})
    assert implausible.temperatures_c == {"CPU-therm": 45.5}  # a powered-down block's zone is no temperature


AT_MAX = BoardState(power_mode="MAXN", power_mode_id=0, cpu_governors=dict.fromkeys(range(4), "performance"),
                    cpu_freq_khz=dict.fromkeys(range(4), 1479000), cpu_max_khz=dict.fromkeys(range(4), 1479000),
                    gpu_freq_hz=921_600_000, gpu_max_hz=921_600_000, temperatures_c={"CPU-therm": 41.0},
                    throttled={"throttled now": False, "throttling occurred": False})


def test_nothing_to_say():
    assert judge(AT_MAX, AT_MAX.model_copy(update={"temperatures_c": {"CPU-therm": 50.5}})) == []
    assert judge(BoardState(), BoardState()) == []  # unknown everywhere: the caller shows "unknown"
    assert judge(AT_MAX, BoardState()) == []


def test_throttled_during_the_run():
    after = AT_MAX.model_copy(update={"throttled": {"throttled now": False, "throttling occurred": True}})
    assert judge(AT_MAX, after) == ["throttled during the run (vcgencmd: throttling occurred)"]
    # Sticky since boot: it can't be told apart from the run, so it is said as such.
    assert judge(after, after) == [
        "vcgencmd: throttling occurred since boot, before the run: a repeat during it would not show"]


def test_below_max_clocks():
    slow = AT_MAX.model_copy(update={"cpu_freq_khz": {0: 1479000, 1: 1479000, 2: 1036800, 3: 1100000}})
    assert judge(AT_MAX, slow) == ["CPU at 1.04 of 1.48 GHz max after the run (cores 2-3)"]
    one_slow = AT_MAX.model_copy(update={"cpu_freq_khz": {0: 1479000, 3: 1100000}})
    assert judge(one_slow, AT_MAX) == ["CPU at 1.10 of 1.48 GHz max before the run (core 3)"]
    within_5_percent = AT_MAX.model_copy(update={"cpu_freq_khz": dict.fromkeys(range(4), 1430000)})
    assert judge(within_5_percent, AT_MAX) == []
    gpu = AT_MAX.model_copy(update={"gpu_freq_hz": 76_800_000})
    assert judge(gpu, AT_MAX) == ["GPU below its maximum clock before the run: 0.08 of 0.92 GHz"]


def test_governor_and_power_mode():
    mixed = AT_MAX.model_copy(update={"cpu_governors": {0: "ondemand", 1: "ondemand", 2: "performance", 4: "ondemand"},
                                      "power_mode": "15W"})
    assert judge(mixed, mixed) == ["CPU governor ondemand on cores 0-1,4 (not performance): clocks may vary",
                                   "power mode 15W (not MAXN)"]
    assert judge(AT_MAX, mixed.model_copy(update={"cpu_governors": {}}))[-2:] == [
        "power mode 15W (not MAXN)", "power mode changed during the run: MAXN -> 15W"]


def test_temperature_rise():
    hot = AT_MAX.model_copy(update={"temperatures_c": {"CPU-therm": 78.2, "GPU-therm": 60.0}})
    assert judge(AT_MAX, hot) == ["temperature rose 41 -> 78 °C (CPU-therm)"]
