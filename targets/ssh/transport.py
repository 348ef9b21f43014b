"""``SSHTransport``: a device reached over SSH, the connection (``connection``), commands and servers left
running (``process``) and forwarded ports (``forward``) put together, with the file operations (SFTP)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import paramiko

from edgedeploy.errors import ConnectFailed, TransportError
from targets.ssh.forward import PortForwarding
from targets.ssh.process import RemoteCommands
from targets.transport import PRIVATE_FILE


class SSHTransport(RemoteCommands, PortForwarding):
    """A device reached over SSH."""

    # -- files ----------------------------------------------------------------------------------
    def write(self, local: Path, remote: str) -> None:
        try:
            self._put(local, remote)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            # The device refused the write (an SFTP status: its disk filled, a permission) over a live connection;
            # a stall or a drop is a connection problem (transient: retried).
            refused = isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, ConnectionError))
            if refused and self._connected():
                raise self._write_refused(local, remote, exc) from exc
            self.close()
            raise ConnectFailed(f"Upload to the device failed: {exc}", host=self.name, path=remote) from exc

    def _put(self, local: Path, remote: str) -> None:
        sftp = self._sftp_client()
        with sftp.open(remote, "wb") as created:  # private before a byte is in it
            created.chmod(PRIVATE_FILE)
        sftp.put(str(local), remote, confirm=False)
        # Pipelined writes don't say that the device refused some of them (a full disk): its size does.
        arrived, size = sftp.stat(remote).st_size, local.stat().st_size
        if arrived != size:
            raise OSError(f"only {arrived} of {size} bytes arrived")

    def _write_refused(self, local: Path, remote: str, exc: BaseException) -> TransportError:
        """sftp-server answers a full disk with a bare "Failure": the free space says whether that was it."""
        try:
            free = self.free_bytes(posixpath.dirname(remote))
        except ConnectFailed:
            raise
        except TransportError:
            free = None
        full = free is not None and free < local.stat().st_size
        return TransportError(
            "The device's disk filled up during the upload" if full else f"The device refused the upload: {exc}",
            host=self.name, path=remote, bytes_needed=local.stat().st_size, bytes_free=free,
            fix="free space on the device or point connection.workdir at a larger disk" if full else
            "check the device's disk and the workdir's permissions")

    def read(self, remote: str, local: Path) -> None:
        try:
            self._sftp_client().get(remote, str(local))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise TransportError(f"Download from the device failed: {exc}", host=self.name, path=remote) from exc

    def sha256(self, remote: str) -> str | None:
        # On stdin: sha256sum escapes a name with a backslash or a newline and marks its hash with a leading "\\",
        # which then never matched (every upload of such a file failed).
        result = self.run(["sh", "-c", 'sha256sum < "$1"', "edgedeploy-sha256", remote], timeout=self.timeouts.command)
        if result.returncode != 0 or not result.stdout.split():
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
        result = self.run(["sh", "-c", 'umask 077 && mkdir -p -- "$1"', "edgedeploy-mkdir", remote],
                          timeout=self.timeouts.command)
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
