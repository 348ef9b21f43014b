"""Connecting to a device over SSH: host keys, authentication, a timeout per phase, and the connection that
every operation shares (re-opened by the next operation once it dropped).

Host keys are verified against the profile's known_hosts (RejectPolicy; never AutoAdd): an
unknown host is refused with its fingerprint and the command to trust it, a changed key is
refused and never retried. Connect, banner, auth and each command have their own timeouts;
keepalive is on. A dropped connection is re-opened by the next operation, so cleanup still happens.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

import paramiko

from edgedeploy.errors import (
    AuthError,
    ConnectFailed,
    HostKeyError,
    TransportError,
    TransportTimeout,
)
from targets.profiles import Connection


@dataclass(frozen=True)
class SSHTimeouts:
    """One limit per phase, in seconds (httpx-style)."""

    connect: float = 10.0
    banner: float = 15.0
    auth: float = 15.0
    command: float = 600.0
    keepalive: int = 15


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint: what `ssh-keygen -lf` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _RejectAndRemember(paramiko.MissingHostKeyPolicy):
    """Refuse unknown hosts, keeping the offered key so the error can show its fingerprint."""

    def __init__(self) -> None:
        self.offered: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):
        self.offered = key
        raise paramiko.SSHException(f"host {hostname} not in known_hosts")


class SSHConnection:
    """The SSH connection to one device, opened when first needed and re-opened after it dropped (the base of
    ``SSHTransport``)."""

    def __init__(self, connection: Connection, *, timeouts: SSHTimeouts | None = None) -> None:
        if not connection.host:
            raise TransportError("The profile's connection has no host", fix="set connection.host")
        self.connection = connection
        self.timeouts = timeouts or SSHTimeouts()
        self.name = f"{connection.user + '@' if connection.user else ''}{connection.host}:{connection.port}"
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection ---------------------------------------------------------------------------
    def _host_key_name(self) -> str:
        host, port = self.connection.host, self.connection.port
        return host if port == 22 else f"[{host}]:{port}"

    def _connect(self) -> paramiko.SSHClient:
        conn, t = self.connection, self.timeouts
        known_hosts = Path(conn.known_hosts or "~/.ssh/known_hosts").expanduser()
        if not known_hosts.is_file():
            raise HostKeyError(
                f"known_hosts file {known_hosts} does not exist: host keys can't be verified",
                host=self.name, fix=f"ssh-keyscan -p {conn.port} {conn.host} >> {known_hosts}   "
                                    "(then compare the fingerprint with the device's own)",
            )
        client = paramiko.SSHClient()
        client.load_host_keys(str(known_hosts))
        policy = _RejectAndRemember()
        client.set_missing_host_key_policy(policy)
        key_file = str(Path(conn.key_file).expanduser()) if conn.key_file else None
        try:
            client.connect(
                conn.host, port=conn.port, username=conn.user, key_filename=key_file,
                allow_agent=key_file is None, look_for_keys=False,
                timeout=t.connect, banner_timeout=t.banner, auth_timeout=t.auth, channel_timeout=t.connect,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                "The device's host key has CHANGED since it was trusted: refusing to connect (never retried)",
                host=self.name, known_hosts=str(known_hosts),
                expected=fingerprint(exc.expected_key), offered=fingerprint(exc.key),
                fix="if the device was really reinstalled, remove its old line with "
                    f"ssh-keygen -R '{self._host_key_name()}' -f {known_hosts} and trust the new key",
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthError(f"The device refused our key: {exc}", host=self.name, user=conn.user,
                            key_file=key_file or "(ssh-agent)",
                            fix="check connection.user and connection.key_file, and the device's "
                                "authorized_keys") from None
        except TimeoutError as exc:
            client.close()
            raise TransportTimeout(f"Connecting to the device timed out after {t.connect:.0f} s", host=self.name,
                                   phase="connect") from exc
        except paramiko.SSHException as exc:
            client.close()
            if policy.offered is not None:
                raise HostKeyError(
                    "The device's host key is unknown: refusing to connect",
                    host=self.name, offered=f"{policy.offered.get_name()} {fingerprint(policy.offered)}",
                    known_hosts=str(known_hosts),
                    fix=f"check the fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_*.pub), then: "
                        f"ssh-keyscan -p {conn.port} {conn.host} >> {known_hosts}",
                ) from None
            if "banner" in str(exc).lower():
                raise TransportTimeout(f"The device accepted the connection but sent no SSH banner within "
                                       f"{t.banner:.0f} s", host=self.name, phase="banner") from exc
            raise ConnectFailed(f"SSH negotiation with the device failed: {exc}", host=self.name) from exc
        except OSError as exc:
            client.close()
            raise ConnectFailed(f"Cannot reach the device: {exc.strerror or exc}", host=self.name,
                                fix="check that the device is on and sshd listens on the profile's port") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(t.keepalive)
        return client

    def _connected(self) -> bool:
        """Is the SSH connection up (a status -1 or a failed write over a dead one is a drop, not an answer)?"""
        transport = self._client.get_transport() if self._client else None
        return transport is not None and transport.is_active()

    def _ssh(self) -> paramiko.SSHClient:
        if not self._connected():
            self.close()
            self._client = self._connect()
        return self._client

    def _sftp_client(self) -> paramiko.SFTPClient:
        client = self._ssh()
        if self._sftp is None or self._sftp.get_channel().closed:
            self._sftp = client.open_sftp()
            self._sftp.get_channel().settimeout(self.timeouts.command)
        return self._sftp

    def close(self) -> None:
        for thing in (self._sftp, self._client):
            try:
                if thing is not None:
                    thing.close()
            except Exception:  # closing a dead connection must never mask the real error
                pass
        self._sftp = self._client = None
