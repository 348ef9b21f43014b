"""The test lab: real sshd servers on loopback, each with its own host key, user key and port, and
profile files that point at them. One serves an x86 "server"; one an emulated Raspberry Pi 4 whose
Python is arm64 Debian's under qemu-aarch64 (built by scripts/make_aarch64_root.sh)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
AARCH64 = Path(os.environ.get("EDGEDEPLOY_AARCH64_ROOT", REPO / ".lab" / "aarch64"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class LabDevice:
    """One sshd on 127.0.0.1 and everything a profile needs to reach it."""

    name: str
    base: Path
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    host_public_key: str
    process: subprocess.Popen

    def profile(self, *, extends: str, python: list[str], **extra) -> Path:
        data = {
            "extends": extends, "name": self.name, **extra,
            "connection": {
                "transport": "ssh", "host": "127.0.0.1", "port": self.port, "user": self.user,
                "key_file": str(self.key_file), "known_hosts": str(self.known_hosts), "python": python,
                "workdir": str(self.base / "device"),
            },
        }
        path = self.base / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _sshd_on(base: Path, port: int) -> subprocess.Popen | None:
    """sshd listening on 127.0.0.1:``port``, or None if it exited (the port was taken)."""
    pid_file = base / "sshd.pid"
    pid_file.unlink(missing_ok=True)
    (base / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host_key'}", f"PidFile {pid_file}",
        f"AuthorizedKeysFile {base / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp", "LogLevel ERROR", "MaxStartups 50", "MaxSessions 50", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")],
                               stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "wb"))
    # sshd writes its pid file once its socket listens: a successful connect alone could reach whoever else
    # holds the port.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        if pid_file.exists() and pid_file.read_text().strip() == str(process.pid):
            return process
        time.sleep(0.05)
    process.kill()
    return None


def start_sshd(base: Path, name: str) -> LabDevice:
    base.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(base / "host_key")
    user_pub = keygen(base / "user_key")
    (base / "authorized_keys").write_text(user_pub + "\n")
    # free_port's port is free only until somebody else takes it (another xdist worker's sshd or server): sshd
    # then can't bind and exits, and it is started again on another port.
    for _ in range(5):
        port = free_port()
        process = _sshd_on(base, port)
        if process is not None:
            break
    else:
        raise RuntimeError(f"sshd did not start: {(base / 'sshd.log').read_text()}")
    key_type, key_body = host_pub.split()[:2]
    (base / "known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {key_body}\n")
    import getpass

    return LabDevice(name=name, base=base, port=port, user=getpass.getuser(), key_file=base / "user_key",
                     known_hosts=base / "known_hosts", host_public_key=host_pub, process=process)


def x86_python() -> list[str]:
    """The x86 lab device runs the runner with this project's interpreter (it has tvm, onnxruntime, numpy)."""
    return [sys.executable]


def aarch64_python() -> list[str] | None:
    """arm64 Debian Python under qemu-aarch64 with the aarch64 wheels (scripts/make_aarch64_root.sh's wrapper, which
    the Pythons it starts run under qemu too), or None when not built."""
    wrapper = AARCH64 / "python3"
    if not (AARCH64 / ".ready").exists() or not wrapper.exists() or not shutil.which("qemu-aarch64"):
        return None
    return [str(wrapper)]


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned zombie waits for init to reap it; it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (the lab devices are this machine)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def all_gone(pids: list[int], within: float = 10.0) -> bool:
    """Whether every one of ``pids`` has ended within ``within`` seconds."""
    deadline = time.monotonic() + within
    while any(process_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
