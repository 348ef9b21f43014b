"""docker/: no Docker engine runs here, so the files are parsed and held against what the tests run."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from edgedeploy.cli import lab_schedule_command

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
INSTRUCTIONS = {"FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "EXPOSE", "CMD", "ENTRYPOINT", "VOLUME", "USER",
                "ARG", "LABEL", "HEALTHCHECK", "SHELL"}


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _dockerfile_lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("name", ["device.Dockerfile", "controller.Dockerfile"])
def test_dockerfiles_parse_and_copy_what_exists(name):
    lines = _dockerfile_lines(DOCKER / name)
    assert lines[0].startswith("FROM ")
    for line in lines:
        assert line.split()[0] in INSTRUCTIONS, line
        if line.startswith("COPY "):
            source = line.split()[1]
            assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"([A-Za-z][\w.-]*)(?:\[[\w,]+\])?==([\w.]+)", text))


def test_image_pins_match_the_project():
    from packaging.requirements import Requirement

    project = {r.name: r.specifier for r in map(Requirement, tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"])}
    makefile = _pins((ROOT / "Makefile").read_text())
    for name in ("device.Dockerfile", "controller.Dockerfile"):
        for package, version in _pins((DOCKER / name).read_text()).items():
            if package in project:
                assert version in project[package], f"{name} pins {package}=={version}; the project wants " \
                                                    f"{project[package]}"
            else:
                assert makefile.get(package) == version, f"{name} pins {package}=={version}, the Makefile " \
                                                         f"{makefile.get(package)}"


def test_compose_services_and_commands_exist():
    services = compose()["services"]
    assert {"db", "prefect-server", "worker", "dashboard", "device-x86"} <= set(services)
    default_pool = inspect.signature(lab_schedule_command).parameters["pool"].default
    assert services["worker"]["command"][services["worker"]["command"].index("--pool") + 1] == default_pool
    for service in services.values():
        command = service.get("command")
        if not command:
            continue
        if command[0] == "deploy":
            argv = [sys.executable, "-m", "edgedeploy", command[1], "--help"]
        else:  # prefect server start / prefect worker start
            argv = [str(Path(sys.executable).with_name("prefect")), *command[1:3], "--help"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-500:]}"
        for flag in [c for c in command if c.startswith("--")]:
            assert flag in proc.stdout, f"{command}: {flag} is not an option of that command"


def test_compose_uses_postgres_for_both_prefect_and_results():
    services = compose()["services"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    env = compose()["x-controller"]["environment"]
    assert env["EDGEDEPLOY_DB_URL"].startswith("postgresql+psycopg://")
    init = (DOCKER / "postgres-init.sh").read_text()
    assert "CREATE DATABASE prefect" in init and "CREATE DATABASE edgedeploy" in init


def test_compose_keeps_secrets_out_and_the_api_on_loopback():
    """The worker holds the lab's SSH key: the Prefect API (which schedules flows on it) and the dashboard listen
    on loopback only, the API asks for its auth string, and no password is written in the files."""
    import re

    text = (DOCKER / "compose.yml").read_text() + (DOCKER / "postgres-init.sh").read_text()
    services = compose()["services"]
    for name in ("prefect-server", "dashboard"):
        assert all(str(port).startswith("127.0.0.1:") for port in services[name]["ports"]), name
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert "PREFECT_API_AUTH_STRING" in compose()["x-controller"]["environment"]
    assert not re.search(r"PASSWORD '[^']", text)  # init: psql variables, not literals
    for url in re.findall(r"postgresql\+\w+://[^\s\"]+", text):
        assert re.match(r"postgresql\+\w+://\w+:\$\{\w+:\?", url), url  # every password from the environment
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text


def test_device_sshd_is_key_only_like_the_test_lab():
    config = (DOCKER / "device-sshd_config").read_text()
    lab = (ROOT / "tests" / "lab.py").read_text()
    for option in ("PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                   "Subsystem sftp internal-sftp"):
        assert option in config and option in lab
