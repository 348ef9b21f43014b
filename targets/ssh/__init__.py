"""SSH transport: the only package that imports paramiko.

Host keys are verified against the profile's known_hosts (RejectPolicy; never AutoAdd): an
unknown host is refused with its fingerprint and the command to trust it, a changed key is
refused and never retried. Connect, banner, auth and each command have their own timeouts;
keepalive is on. Every remote command is an argv list joined with shlex quoting, and runs under
`timeout` on the device, which signals its whole process group: a hung benchmark leaves
no orphan. A dropped connection is re-opened by the next operation, so cleanup still happens.

Two more things ride on the same connection, for tuning on the board: a long-running command (TVM's RPC
server) started with ``start()`` and tied to its SSH channel, so that it dies with its whole process group
when we stop it, when the connection drops or when its time limit passes; and ``forward()``, a port on
127.0.0.1 here whose connections are carried to a (host, port) as the device sees it ("direct-tcpip").

The modules: ``connection`` (host keys, authentication, timeouts per phase, the shared connection),
``process`` (commands, their time limits and process groups, servers left running), ``forward`` (forwarded
ports) and ``transport`` (``SSHTransport``, all of them together, with the file operations).
"""

from targets.ssh.connection import SSHTimeouts, fingerprint
from targets.ssh.forward import NothingListening, PortForward
from targets.ssh.process import KILLED_BY_TIMEOUT, RemoteProcess, supervisor
from targets.ssh.transport import SSHTransport

__all__ = [
    "KILLED_BY_TIMEOUT",
    "supervisor",
    "NothingListening",
    "PortForward",
    "RemoteProcess",
    "SSHTimeouts",
    "SSHTransport",
    "fingerprint",
]
