"""The board's state (power mode, clocks, governors, temperatures, throttling), read before and after a benchmark run.

A latency measured while the board throttled, sat in a low power mode or ran below its maximum clocks is not the
board's best: ``judge`` turns two snapshots into marks that say so beside the numbers. ``PROBE`` runs on the device's
own Python (standard library only, Python 3.6 grammar: JetPack 4.x) and reports whatever sources the board has; a
missing or unreadable one is null, never an error, and reading the state never fails the run it annotates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import groupby

from pydantic import BaseModel, ConfigDict, Field

from targets.transport import Transport

# Units as the sources give them (kHz, Hz, millidegrees): converting is the host's job, so the probe stays small.
# EDGEDEPLOY_SYSFS_ROOT prefixes every /sys path and commands are found on PATH: tests fake both.
PROBE = r'''
import glob, json, os, re, signal, subprocess
ROOT = os.environ.get("EDGEDEPLOY_SYSFS_ROOT", "/")
def sysfs(path):
    return os.path.join(glob.escape(ROOT), path.lstrip("/"))
def read(path, convert=str):
    try:
        with open(path) as fh:
            return convert(fh.read().strip())
    except (OSError, ValueError):
        return None
def command(*argv):
    # Its own session, killed whole after 5 s: a hung tool must not hang the probe. No sudo: it would prompt.
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out = proc.communicate(timeout=5)[0]
    except OSError:
        return None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return proc.returncode, out.decode("utf-8", "replace")[-4000:]
def nvpmodel():
    result = command("nvpmodel", "-q")  # "NV Power Mode: MAXN" then the mode's number on the next line
    mode = re.search(r"NV Power Mode:[ \t]*(.*\S)\s*(\d*)", result[1]) if result else None
    return result and {"name": mode and mode.group(1), "id": int(mode.group(2)) if mode and mode.group(2) else None,
                       "raw": result[1]}
def jetson_clocks():
    result = command("jetson_clocks", "--show")
    if result is None or result[0] != 0 or "MaxFreq" not in result[1]:
        return result and {"status": "unknown", "raw": result[1]}  # not root: it refuses to show
    found = {"status": "ok", "raw": result[1], "cpus": {}}
    for line in result[1].splitlines():  # "cpu0: ... MaxFreq=1479000 CurrentFreq=..." (kHz), "GPU ...", "EMC ..." (Hz)
        name, fields = (line.replace(":", " ").split() or [""])[0], dict(re.findall(r"(\w+)=(\S+)", line))
        if "MaxFreq" not in fields:
            continue
        clock = {"cur": int(fields.get("CurrentFreq", 0)) or None, "max": int(fields["MaxFreq"]),
                 "governor": fields.get("Governor")}
        if re.match(r"cpu\d+$", name):
            found["cpus"][name[3:]] = clock
        elif name in ("GPU", "EMC"):
            found[name.lower()] = clock
    return found
def cpus():
    found = {}
    for path in glob.glob(sysfs("/sys/devices/system/cpu/cpu[0-9]*/cpufreq")):
        core_dir = os.path.dirname(path)
        if read(os.path.join(core_dir, "online")) == "0":
            continue  # a power mode that parks cores leaves stale values behind
        max_khz = read(path + "/cpuinfo_max_freq", int) or read(path + "/scaling_max_freq", int)
        found[os.path.basename(core_dir)[3:]] = {
            "governor": read(path + "/scaling_governor"), "cur": read(path + "/scaling_cur_freq", int), "max": max_khz}
    return found or None
def gpu():
    # Jetson GPUs are devfreq devices: 57000000.gpu (Nano), 17000000.gp10b/gv11b/ga10b (TX2, Xavier, Orin).
    for pattern in ("/sys/devices/gpu.0/devfreq/*", "/sys/class/devfreq/*"):
        for path in sorted(glob.glob(sysfs(pattern))):
            cur = read(path + "/cur_freq", int) if re.search(r"gpu|g[apv]\d+b", os.path.basename(path)) else None
            if cur is not None:
                return {"device": os.path.basename(path), "cur": cur, "max": read(path + "/max_freq", int)}
    return None
def thermal():
    found = {}
    zones = glob.glob(sysfs("/sys/class/thermal/thermal_zone*"))
    for zone in sorted(zones, key=lambda z: int(re.sub(r"\D", "", os.path.basename(z)) or 0)):
        kind, temp = read(zone + "/type") or os.path.basename(zone), read(zone + "/temp", int)
        if temp is not None:  # a repeated type (two "acpitz") keeps both, told apart by zone
            found[kind if kind not in found else kind + " (" + os.path.basename(zone) + ")"] = temp
    return found or None
def vcgencmd():
    throttled = command("vcgencmd", "get_throttled")  # "throttled=0x50005"
    if throttled is None:
        return None
    arm = command("vcgencmd", "measure_clock", "arm") or (1, "")  # "frequency(48)=1500398464"
    bits, arm_hz = re.search(r"throttled=(0x[0-9a-fA-F]+)", throttled[1]), re.search(r"=(\d+)", arm[1])
    return {"throttled": bits.group(1) if bits else None, "arm_hz": int(arm_hz.group(1)) if arm_hz else None,
            "raw": throttled[1] + arm[1]}
def guarded(source):
    try:
        return source()
    except Exception:  # one broken source must not hide the others
        return None
print(json.dumps(dict((source.__name__, guarded(source))
                      for source in (nvpmodel, jetson_clocks, cpus, gpu, thermal, vcgencmd))))
'''

# vcgencmd get_throttled: bits 0-3 are the state now, 16-19 the same since boot.
THROTTLE_BITS = {0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now",
                 3: "soft temperature limit now", 16: "under-voltage occurred", 17: "ARM frequency capping occurred",
                 18: "throttling occurred", 19: "soft temperature limit occurred"}
RAW_CHARS = 1500  # each source's own text, kept for a person puzzled by a mark, small enough for every result
BELOW_MAX = 0.95  # a clock more than 5 % under its maximum is marked
TEMPERATURE_RISE_C = 10.0
PLAUSIBLE_C = (-40.0, 150.0)  # Jetson zones of powered-down blocks read -256 °C: not a temperature


class BoardState(BaseModel):
    """One snapshot of the board. Anything the board did not tell is None or empty: "unknown", never a guess."""

    model_config = ConfigDict(frozen=True)
    power_mode: str | None = Field(None, description="Jetson nvpmodel power mode name, e.g. MAXN or 5W.")
    power_mode_id: int | None = Field(None, description="Jetson nvpmodel power mode number, e.g. 0.")
    cpu_governors: dict[int, str] = Field(default_factory=dict, description="cpufreq governor of each online core.")
    cpu_freq_khz: dict[int, int] = Field(default_factory=dict, description="Current clock of each online core, kHz.")
    cpu_max_khz: dict[int, int] = Field(default_factory=dict, description="Maximum clock of each online core, kHz.")
    gpu_freq_hz: int | None = Field(None, description="Current GPU clock (Jetson devfreq or jetson_clocks), Hz.")
    gpu_max_hz: int | None = Field(None, description="Maximum GPU clock, Hz.")
    emc_freq_hz: int | None = Field(None, description="Current memory (EMC) clock, Hz (jetson_clocks as root only).")
    emc_max_hz: int | None = Field(None, description="Maximum memory (EMC) clock, Hz.")
    arm_clock_hz: int | None = Field(None, description="Raspberry Pi ARM clock as the firmware runs it, Hz.")
    temperatures_c: dict[str, float] = Field(default_factory=dict, description="Thermal zone type -> °C.")
    throttled: dict[str, bool] | None = Field(None, description="Raspberry Pi get_throttled flags, decoded.")
    raw: dict[str, str] = Field(default_factory=dict, description="The sources' own text, cut short (unknown: no root)")

    @classmethod
    def from_probe(cls, probed: dict) -> BoardState:
        """The probe's JSON as a snapshot; a malformed source is left unknown, never an exception."""
        fields, raw = {}, {}
        for read_source in (_power_mode, _clocks, _temperatures, _raspberry):
            try:
                part = read_source(probed)
                cls(**part)  # each source checked alone: a malformed one must not take the others with it
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
            raw.update(part.pop("raw", {}))
            fields.update(part)
        return cls(**fields, raw=raw)


def _power_mode(probed: dict) -> dict:
    mode = probed.get("nvpmodel") or {}
    return {"power_mode": mode.get("name"), "power_mode_id": mode.get("id"),
            "raw": {"nvpmodel": mode["raw"][-RAW_CHARS:]} if mode.get("raw") else {}}


def _clocks(probed: dict) -> dict:
    # jetson_clocks first, sysfs over it: sysfs needs no root and is read the moment the probe ran.
    shown = probed.get("jetson_clocks") or {}
    part: dict = {"raw": {}, "cpu_governors": {}, "cpu_freq_khz": {}, "cpu_max_khz": {}}
    if shown:
        part["raw"]["jetson_clocks"] = "unknown" if shown["status"] == "unknown" else shown["raw"][-RAW_CHARS:]
    for source in (shown.get("cpus") or {}, probed.get("cpus") or {}):
        for core, clock in source.items():
            for key, value in (("cpu_governors", "governor"), ("cpu_freq_khz", "cur"), ("cpu_max_khz", "max")):
                if clock.get(value) is not None:
                    part[key][int(core)] = clock[value]
    for name, clock in (("gpu", shown.get("gpu")), ("emc", shown.get("emc")), ("gpu", probed.get("gpu"))):
        if clock and clock.get("cur") is not None:
            part.update({f"{name}_freq_hz": clock["cur"], f"{name}_max_hz": clock.get("max")})
    if probed.get("gpu"):
        part["raw"]["gpu_devfreq"] = probed["gpu"]["device"]
    return part


def _temperatures(probed: dict) -> dict:
    celsius = {zone: milli / 1000.0 for zone, milli in (probed.get("thermal") or {}).items()}
    return {"temperatures_c": {zone: c for zone, c in celsius.items() if PLAUSIBLE_C[0] <= c <= PLAUSIBLE_C[1]}}


def _raspberry(probed: dict) -> dict:
    pi = probed.get("vcgencmd") or {}
    bits = int(pi["throttled"], 16) if pi.get("throttled") else None
    return {"arm_clock_hz": pi.get("arm_hz"), "raw": {"vcgencmd": pi["raw"][-RAW_CHARS:]} if pi.get("raw") else {},
            "throttled": None if bits is None else {flag: bool(bits >> bit & 1) for bit, flag in THROTTLE_BITS.items()}}


def _cores(cores: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> 'cores 0-3,6': consecutive cores keep core - position constant, so a run is one group."""
    runs = [[core for _, core in run] for _, run in groupby(enumerate(sorted(cores)), lambda pair: pair[1] - pair[0])]
    return ("cores " if len(cores) > 1 else "core ") + ",".join(f"{r[0]}-{r[-1]}" if r[1:] else str(r[0]) for r in runs)


def _below_max(state: BoardState, when: str) -> list[str]:
    """Clocks below their maximum where they should be at it: a core whose governor holds it at the top (performance)
    is capped (thermal, power); under ondemand/schedutil an idle snapshot is low anyway and the governor mark says
    so. Jetson GPU/EMC clocks are marked as they are (jetson_clocks pins them for stable numbers)."""
    marks = []
    pinned = {core for core, governor in state.cpu_governors.items() if governor == "performance"}
    cur_khz, top_khz = state.cpu_freq_khz, state.cpu_max_khz
    low = [core for core, khz in cur_khz.items()
           if core in pinned and top_khz.get(core) and khz < BELOW_MAX * top_khz[core]]
    if low:
        slowest = min(low, key=lambda core: cur_khz[core] / top_khz[core])
        marks.append(f"CPU at {cur_khz[slowest] / 1e6:.2f} of {top_khz[slowest] / 1e6:.2f} GHz max {when} the run "
                     f"({_cores(low)})")
    all_pinned = bool(pinned) and len(pinned) == len(state.cpu_governors)
    cpu_max_hz = max(top_khz.values(), default=0) * 1000 if all_pinned else 0
    others = (("GPU", state.gpu_freq_hz, state.gpu_max_hz), ("memory (EMC)", state.emc_freq_hz, state.emc_max_hz),
              ("ARM (vcgencmd)", state.arm_clock_hz, cpu_max_hz))
    for label, cur, top in others:
        if cur and top and cur < BELOW_MAX * top:
            marks.append(f"{label} below its maximum clock {when} the run: {cur / 1e9:.2f} of {top / 1e9:.2f} GHz")
    return marks


def _throttling(before: BoardState, after: BoardState) -> list[str]:
    was = {flag for flag, on in (before.throttled or {}).items() if on}
    now = {flag for flag, on in (after.throttled or {}).items() if on}
    # The "occurred" bits stick from boot on: only one that appeared between the snapshots dates from the run.
    during = sorted(f for f in now if f.endswith(" now") or (before.throttled is not None and f not in was))
    already = sorted(f for f in was if f.endswith(" now"))
    said = (("throttled during the run", during), ("throttled before the run", already))
    marks = [f"{what} (vcgencmd: {', '.join(flags)})" for what, flags in said if flags]
    since_boot = sorted(f for f in (now if before.throttled is None else was) if f.endswith(" occurred"))
    if since_boot:
        marks.append(f"vcgencmd: {', '.join(since_boot)} since boot, before the run: a repeat during it would not show")
    return marks


def judge(before: BoardState, after: BoardState) -> list[str]:
    """Marks for a run between these two snapshots; a source either lacks says nothing (the caller shows unknown)."""
    governors = before.cpu_governors or after.cpu_governors
    marks = [f"CPU governor {governor} on {_cores([c for c, g in governors.items() if g == governor])} "
             "(not performance): clocks may vary" for governor in sorted(set(governors.values()) - {"performance"})]
    marks += [f"power mode {mode} (not MAXN)" for mode in dict.fromkeys((before.power_mode, after.power_mode))
              if mode and not mode.upper().startswith("MAXN")]
    if before.power_mode and after.power_mode and before.power_mode != after.power_mode:
        marks.append(f"power mode changed during the run: {before.power_mode} -> {after.power_mode}")
    marks += _below_max(before, "before") + _below_max(after, "after") + _throttling(before, after)
    then, later = before.temperatures_c, after.temperatures_c
    hottest = max((zone for zone in then if zone in later), key=lambda zone: later[zone] - then[zone], default=None)
    if hottest is not None and later[hottest] - then[hottest] >= TEMPERATURE_RISE_C:
        marks.append(f"temperature rose {then[hottest]:.0f} -> {later[hottest]:.0f} °C ({hottest})")
    return marks


def read_board_state(transport: Transport, python_argv: Sequence[str]) -> BoardState:
    """The board's state now, through its own Python; all unknown where that fails: this never fails a run."""
    try:
        result = transport.run([*python_argv, "-c", PROBE], timeout=30)
        probed = json.loads(result.stdout.strip().splitlines()[-1])
    except Exception:  # a dead link, a timeout, a Python that failed or printed garbage: the run's numbers still stand
        return BoardState()
    return BoardState.from_probe(probed) if isinstance(probed, dict) else BoardState()
