"""Open the transport a profile asks for."""

from __future__ import annotations

from targets.profiles import DeviceProfile
from targets.transport import LocalTransport, Transport, expand_workdir


def open_transport(profile: DeviceProfile) -> tuple[Transport, str]:
    """(transport, the device's workdir with ~ expanded there)."""
    if profile.connection.transport == "local":
        return LocalTransport(), expand_workdir(profile.connection.workdir)
    from targets.ssh import SSHTransport  # paramiko only when a profile needs it

    transport = SSHTransport(profile.connection)
    try:
        return transport, transport.resolve(profile.connection.workdir)
    except BaseException:
        transport.close()
        raise
