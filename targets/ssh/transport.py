"""``SSHTransport``: a device reached over SSH, the connection (``connection``), commands and servers left
running (``process``) and forwarded ports (``forward``) put together, with the file operations (SFTP)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import paramiko

from edgedeploy.errors import ConnectFailed, TransportError
from targets.ssh.forward import PortForwarding
from targets.ssh.process import RemoteCommands


class SSHTransport(RemoteCommands, PortForwarding):
    """A device reached over SSH."""

    # -- files ----------------------------------------------------------------------------------
    def write(self, local: Path, remote: str) -> None:
        try:
            self._sftp_client().put(str(local), remote, confirm=False)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.close()
            raise ConnectFailed(f"Upload to the device failed: {exc}", host=self.name, path=remote) from exc

    def read(self, remote: str, local: Path) -> None:
        try:
            self._sftp_client().get(remote, str(local))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise TransportError(f"Download from the device failed: {exc}", host=self.name, path=remote) from exc

    def sha256(self, remote: str) -> str | None:
        result = self.run(["sha256sum", "--", remote], timeout=self.timeouts.command)
        if result.returncode != 0:
            return None
        return result.stdout.split()[0]

    def rename(self, src: str, dst: str) -> None:
        self._sftp_client().posix_rename(src, dst)  # rename(2): atomic, replaces dst

    def remove(self, remote: str) -> None:
        try:
            self._sftp_client().remove(remote)
        except FileNotFoundError:
            pass

    def makedirs(self, remote: str) -> None:
        result = self.run(["mkdir", "-p", "--", remote], timeout=self.timeouts.command)
        if result.returncode != 0:
            raise TransportError(f"Cannot create {remote} on the device", host=self.name,
                                 value=result.stderr.strip()[:300])

    def free_bytes(self, remote_dir: str) -> int:
        result = self.run(["df", "-P", "-B1", "--", remote_dir], timeout=self.timeouts.command)
        try:
            return int(result.stdout.strip().splitlines()[-1].split()[3])
        except (IndexError, ValueError):
            raise TransportError(f"Cannot read free disk space of {remote_dir} on the device", host=self.name,
                                 value=(result.stdout + result.stderr).strip()[:300]) from None

    def home(self) -> str:
        return self._sftp_client().normalize(".")

    def resolve(self, path: str) -> str:
        """A workdir with ~ expanded on the device (SFTP doesn't expand it)."""
        if path == "~" or path.startswith("~/"):
            return posixpath.join(self.home(), path[2:])
        return path
