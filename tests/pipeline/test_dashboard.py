"""The dashboard in a real headless Chromium (Debian's package): the matrix's content, and a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.regression import RegressionPolicy
from pipeline.results.dashboard import make_server
from pipeline.results.store import ResultStore
from tests.factories import make_result

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network: without the background-networking ones Chromium keeps trying Google's hosts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def served(tmp_path):
    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    policy = RegressionPolicy()
    for night in range(5):
        store.record(make_result(night, profile="lab-x86"), manifest={"artifact": {"sha256": "aa"}}, policy=policy)
        store.record(make_result(night, profile="lab-pi4", centre_ms=40.0, seed=100 + night), manifest={},
                     policy=policy)
        store.record(make_result(night, profile="lab-x86", model="pp-lcnet-orientation", centre_ms=120.0,
                                 accuracy=1.0, seed=200 + night), manifest={}, policy=policy)
    # Night 5 on the Pi: 25 % slower.
    store.record(make_result(5, profile="lab-pi4", centre_ms=50.0, seed=105), manifest={}, policy=policy)
    server = make_server(store, port=0, prefect_ui="http://127.0.0.1:4200")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


class Cells(HTMLParser):
    """Collect the matrix's cells: (device, model) -> (classes, text)."""

    def __init__(self):
        super().__init__()
        self.cells, self._current, self._depth = {}, None, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-device" in attrs:
            self._current = (attrs["data-device"], attrs["data-model"])
            self.cells[self._current] = [attrs["class"], ""]

    def handle_endtag(self, tag):
        if tag == "td":
            self._current = None

    def handle_data(self, data):
        if self._current:
            self.cells[self._current][1] += data + " "


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120)


def test_matrix_in_chromium(served, tmp_path):
    dom = _chromium("--dump-dom", served, tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = Cells()
    parser.feed(dom.stdout)
    cells = parser.cells
    assert set(cells) == {("lab-x86", "digits-cnn"), ("lab-pi4", "digits-cnn"), ("lab-x86", "pp-lcnet-orientation")}
    pi_classes, pi_text = cells[("lab-pi4", "digits-cnn")]
    assert "regression" in pi_classes and "REGRESSION" in pi_text and "6 night(s)" in pi_text
    x86_classes, x86_text = cells[("lab-x86", "digits-cnn")]
    assert "regression" not in x86_classes and "valid" in x86_text and "top1 99.00 %" in x86_text
    p50 = float(re.search(r"([\d.]+) ms", x86_text).group(1))
    assert 9.0 < p50 < 11.0  # the factory's nights centre on 10 ms
    assert "vs onnxruntime fp32" in x86_text
    # Per cell: a trend over nights with the regression marked, and the latency distribution.
    assert dom.stdout.count("class=\"trend\"") == 3 and dom.stdout.count("class=\"histogram\"") == 3
    assert "circle class=\"regression\"" in dom.stdout
    assert "/runs/flow-run/" not in dom.stdout or "http://127.0.0.1:4200" in dom.stdout
    assert "manifest.json" in dom.stdout and "<script" not in dom.stdout and "http" not in dom.stdout.split(
        "<body>")[0].replace("http-equiv", "")  # nothing fetched from elsewhere

    shot = tmp_path / "dashboard.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1400,1100", served, tmp=tmp_path)
    assert result.returncode == 0 and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest_link_serves_the_stored_manifest(served, tmp_path):
    import json
    import urllib.request

    with urllib.request.urlopen(served + "runs/night004-digits-cnn-lab-x86/manifest.json") as response:
        assert json.loads(response.read()) == {"artifact": {"sha256": "aa"}}


def test_stored_markup_is_escaped_everywhere_on_the_page(tmp_path):
    """A shared database is as trusted as its least careful writer: the flow run id went into an href as it was."""
    from pipeline.results.dashboard import render

    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    evil = "x'><script>alert(1)</script>"
    result = make_result(0, profile="lab-<b>x86</b>", model="<img src=x onerror=alert(2)>")
    store.record(result.model_copy(update={"flow_run_id": evil, "run_id": "run'><script>alert(3)</script>"}),
                 manifest={}, policy=RegressionPolicy())
    page = render(store, prefect_ui="http://127.0.0.1:4200")
    assert "<script>" not in page and "<img" not in page and "<b>" not in page
    assert "/runs/flow-run/x%27%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E" in page


def _raw_connection(port: int):
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_idle_connections_are_dropped_and_bounded(tmp_path, monkeypatch):
    """Slowloris: a client that connects and sends nothing is dropped after the request timeout; connections past
    the bound are closed at once instead of each getting a thread."""
    import time

    from pipeline.results import dashboard

    monkeypatch.setattr(dashboard, "REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(dashboard, "MAX_CONNECTIONS", 2)
    server = make_server(ResultStore(f"sqlite:///{tmp_path / 'results.db'}"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        idle = [_raw_connection(server.server_port) for _ in range(2)]
        time.sleep(0.3)
        extra = _raw_connection(server.server_port)
        assert extra.recv(1) == b""  # closed at once: both slots are taken
        started = time.monotonic()
        assert idle[0].recv(1) == b""  # dropped by the timeout, not kept forever
        assert time.monotonic() - started < 4
        time.sleep(0.3)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=5) as page:  # slots free again
            assert page.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_is_rendered_again_only_when_the_database_changes(tmp_path):
    from pipeline.results.dashboard import PageCache

    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    store.record(make_result(0), manifest={}, policy=RegressionPolicy())
    cache = PageCache(store, None)
    first = cache.page()
    assert cache.page() == first and cache.renders == 1
    store.record(make_result(1), manifest={}, policy=RegressionPolicy())
    assert cache.page() != first and cache.renders == 2
