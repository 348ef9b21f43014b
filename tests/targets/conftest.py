from __future__ import annotations

import pytest

from tests.lab import start_sshd


@pytest.fixture(scope="session")
def lab_x86(tmp_path_factory):
    """A real sshd on 127.0.0.1 with its own host key, user key and port."""
    device = start_sshd(tmp_path_factory.mktemp("lab-x86"), "lab-x86")
    yield device
    device.stop()
