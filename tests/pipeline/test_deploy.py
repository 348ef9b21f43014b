"""The deploy protocol against a real directory, with fault layers where a real fault can't be made."""

from __future__ import annotations

import os

import pytest

from edgedeploy.errors import ChecksumMismatch, TransportError
from pipeline.deploy import place_file
from targets.transport import LocalTransport


class CorruptingTransport(LocalTransport):
    """The bytes that arrive differ from the bytes sent (a bad disk, a broken link)."""

    def write(self, local, remote):
        super().write(local, remote)
        with open(remote, "r+b") as fh:
            fh.write(b"X")


class CutTransport(LocalTransport):
    """The upload dies half way."""

    def write(self, local, remote):
        with open(local, "rb") as src, open(remote, "wb") as dst:
            dst.write(src.read()[:10])
        raise TransportError("connection lost mid-upload", host="test")


class TinyDiskTransport(LocalTransport):
    def free_bytes(self, remote_dir):
        return 5


@pytest.fixture
def files(tmp_path):
    new = tmp_path / "new.so"
    new.write_bytes(b"new artifact " * 100)
    device = tmp_path / "device"
    device.mkdir()
    final = device / "model.so"
    final.write_bytes(b"previous artifact")
    return new, device, final


def _leftovers(device):
    return sorted(p for p in os.listdir(device) if p != "model.so")


def test_upload_then_skip_when_unchanged(files):
    new, device, final = files
    first = place_file(LocalTransport(), new, str(final))
    assert first.uploaded and final.read_bytes() == new.read_bytes()
    assert not place_file(LocalTransport(), new, str(final)).uploaded
    assert _leftovers(device) == []


def test_checksum_mismatch_swaps_nothing_in(files):
    new, device, final = files
    with pytest.raises(ChecksumMismatch) as info:
        place_file(CorruptingTransport(), new, str(final))
    assert final.read_bytes() == b"previous artifact"
    assert _leftovers(device) == []
    assert info.value.context["expected_sha256"] != info.value.context["actual_sha256"]
    assert not info.value.transient


def test_cut_upload_leaves_previous_artifact_and_no_partial(files):
    new, device, final = files
    with pytest.raises(TransportError, match="mid-upload"):
        place_file(CutTransport(), new, str(final))
    assert final.read_bytes() == b"previous artifact"
    assert _leftovers(device) == []


def test_disk_too_small_is_refused_before_upload(files):
    new, device, final = files
    with pytest.raises(TransportError, match="free disk") as info:
        place_file(TinyDiskTransport(), new, str(final))
    assert info.value.context["bytes_needed"] == new.stat().st_size
    assert info.value.context["bytes_free"] == 5
    assert info.value.context["directory"] == str(device)
    assert final.read_bytes() == b"previous artifact" and _leftovers(device) == []
