"""Profiles: the local one detects this host; bad files fail with file, field, value and expectation."""

from __future__ import annotations

import platform

import pytest

from edgedeploy.errors import ProfileError
from targets.profiles import load_profile


def test_local_profile_detects_this_host():
    profile = load_profile("local")
    assert profile.cpu.arch == platform.machine() and profile.cpu.cores >= 1 and profile.memory_mb > 0
    assert profile.connection.transport == "local"


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="Unknown device profile") as info:
        load_profile("jetson-nanoo")
    assert "local" in info.value.expected


def test_extends_with_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: local\nname: my-box\nconnection:\n  workdir: /tmp/my-box\n")
    profile = load_profile(str(path))
    assert profile.name == "my-box" and profile.connection.workdir == "/tmp/my-box"
    assert profile.connection.transport == "local"


def test_unknown_field_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extends: local\nname: bad\nmemroy_mb: 4\n")
    with pytest.raises(ProfileError, match="memroy_mb") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("workdir", ["/opt/m; touch /tmp/x", "$(id)", "/tmp/`id`", "/a b"])
def test_shell_syntax_in_profile_values_is_rejected(tmp_path, workdir):
    path = tmp_path / "evil.yaml"
    path.write_text(f"extends: local\nname: evil\nconnection:\n  workdir: '{workdir}'\n")
    with pytest.raises(ProfileError, match="connection.workdir") as info:
        load_profile(str(path))
    assert workdir in str(info.value)


def test_missing_base(tmp_path):
    path = tmp_path / "orphan.yaml"
    path.write_text("extends: no-such-board\nname: orphan\n")
    with pytest.raises(ProfileError, match="no-such-board"):
        load_profile(str(path))
