"""The device-lab dashboard: one self-contained HTML page (inline CSS and SVG; no CDN, works offline).

A devices x models matrix with the latest p50/p90, accuracy, speed-up vs onnxruntime fp32 and
validity; regressions highlighted; for each cell a trend chart over nights and the latest latency
distribution, with links to the manifest and to the Prefect flow run. Served by the standard
library's HTTP server (`deploy dashboard`).
"""

from __future__ import annotations

import html
import json
import os
import threading
from collections import defaultdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

import numpy as np

from pipeline.results.store import ResultStore, RunRow

MAX_CONNECTIONS = 32
REQUEST_TIMEOUT_S = 10.0

CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#1d232a;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px} .dim{color:#6a737d}
table.matrix{border-collapse:collapse;margin-top:12px} .matrix th,.matrix td{border:1px solid #d0d7de;padding:8px 10px;
vertical-align:top;background:#fff} .matrix th{background:#f0f3f6;text-align:left}
td.cell a{color:inherit;text-decoration:none;display:block} td.regression{background:#ffebe9;outline:2px solid #cf222e}
td.invalid{background:#fff8c5} .p50{font-size:16px;font-weight:600} .bad{color:#cf222e;font-weight:600}
.good{color:#1a7f37} .slow{color:#9a6700} section.detail{background:#fff;border:1px solid #d0d7de;padding:12px 16px;
margin-top:16px} section.detail.regression{border-color:#cf222e} svg text{font:11px system-ui,sans-serif;fill:#57606a}
"""


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _percent(value: float | None) -> str:
    return _fmt(None if value is None else value * 100, ".2f", " %")


def _cell_id(model: str, scheme: str, profile: str) -> str:
    raw = f"{profile}--{model}--{scheme}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)


def trend_svg(runs: list[RunRow], width: int = 460, height: int = 150) -> str:
    """p50 and p90 over nights (oldest left); regressions as red dots, invalid runs hollow."""
    runs = sorted(runs, key=lambda r: r.created)
    if not runs:
        return ""
    values = [r.p90_ms for r in runs] + [r.p50_ms for r in runs]
    top, pad = max(values) * 1.1 or 1.0, 34
    step = (width - 2 * pad) / max(len(runs) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad + i * step, height - 20 - (height - 34) * v / top

    lines = []
    for attr, colour in (("p90_ms", "#bf8700"), ("p50_ms", "#0969da")):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, getattr(r, attr)) for i, r in enumerate(runs)))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
    dots = []
    for i, r in enumerate(runs):
        x, y = xy(i, r.p50_ms)
        fill = "#cf222e" if r.regression else ("none" if not r.valid else "#0969da")
        dots.append(f'<circle class="{"regression" if r.regression else "run"}" cx="{x:.1f}" cy="{y:.1f}" r="4" '
                    f'fill="{fill}" stroke="#0969da"><title>{html.escape(r.run_id)}: p50 {r.p50_ms:.3f} ms'
                    f'{" REGRESSION" if r.regression else ""}</title></circle>')
    first, last = runs[0].created.strftime("%m-%d"), runs[-1].created.strftime("%m-%d")
    return (f'<svg class="trend" width="{width}" height="{height}" role="img" '
            f'aria-label="p50 and p90 over nights"><text x="2" y="12">{top:.2f} ms</text>'
            f'<text x="2" y="{height - 22}">0</text><text x="{pad}" y="{height - 4}">{first}</text>'
            f'<text x="{width - pad - 30}" y="{height - 4}">{last}</text>'
            f'<text x="{width - 120}" y="12" style="fill:#0969da">p50</text>'
            f'<text x="{width - 80}" y="12" style="fill:#bf8700">p90</text>{"".join(lines)}{"".join(dots)}</svg>')


def histogram_svg(samples: dict[str, list[float]], width: int = 460, height: int = 150, bins: int = 30) -> str:
    """The latest run's latency distribution: the artifact and onnxruntime fp32 on one axis."""
    series = {k: np.asarray(v, np.float64) for k, v in samples.items() if len(v)}
    if not series:
        return ""
    everything = np.concatenate(list(series.values()))
    lo, hi = np.percentile(everything, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(np.clip(v, lo, hi), edges)[0] / len(v) for k, v in series.items()}
    tallest = max(c.max() for c in counts.values()) or 1.0
    bar_w = (width - 20) / bins
    colours = {"artifact": "#0969da", "baseline": "#8c959f"}
    bars = []
    for name, c in counts.items():
        for i, share in enumerate(c):
            h = (height - 34) * share / tallest
            bars.append(f'<rect class="{html.escape(name)}" x="{10 + i * bar_w:.1f}" y="{height - 20 - h:.1f}" '
                        f'width="{bar_w - 1:.1f}" height="{h:.1f}" fill="{colours.get(name, "#57606a")}" '
                        'fill-opacity="0.6"/>')
    return (f'<svg class="histogram" width="{width}" height="{height}" role="img" aria-label="latency distribution">'
            f'{"".join(bars)}<text x="10" y="{height - 4}">{lo:.3f} ms</text>'
            f'<text x="{width - 80}" y="{height - 4}">{hi:.3f} ms</text>'
            f'<text x="10" y="12" style="fill:#0969da">TVM artifact</text>'
            f'<text x="110" y="12" style="fill:#8c959f">onnxruntime fp32</text></svg>')


def _runs_on(run: RunRow) -> str:
    """Runtime, unit and precision of a run, and whether its board was marked (throttled, below max clocks)."""
    result = run.result or {}
    marks = _board_marks(run)
    before = (result.get("board") or {}).get("before") or {}
    known = any(value not in (None, {}, []) for key, value in before.items() if key != "raw")
    board = "board: unknown" if not known else \
        f"<span class='slow'>board: {len(marks)} mark(s)</span>" if marks else "board: steady"
    return (f"{html.escape(str(result.get('runtime', '?')))} on the {html.escape(str(result.get('unit', 'CPU')))} · "
            f"{html.escape(run.scheme.split()[0])} · {board}")


def _board_marks(run: RunRow) -> list[str]:
    return list(((run.result or {}).get("board") or {}).get("marks") or [])


def render(store: ResultStore, *, prefect_ui: str | None = None) -> str:
    """The whole page."""
    runs = store.runs()
    cells: dict[tuple[str, str, str], list[RunRow]] = defaultdict(list)
    for r in runs:
        cells[(r.profile, r.model_name, r.scheme)].append(r)
    devices = sorted({k[0] for k in cells})
    columns = sorted({(k[1], k[2]) for k in cells})
    head = "".join(f"<th>{html.escape(m)}<br><span class='dim'>{html.escape(s)}</span></th>" for m, s in columns)
    body = []
    for device in devices:
        row = [f"<th>{html.escape(device)}</th>"]
        for model, scheme in columns:
            history = cells.get((device, model, scheme))
            if not history:
                row.append("<td class='empty dim'>not run</td>")
                continue
            latest = history[0]  # newest first
            classes = ["cell", *(["regression"] if latest.regression else []),
                       *([] if latest.valid else ["invalid"])]
            speed_class = "good" if latest.speedup >= 1 else "slow"
            status = ("<span class='bad'>REGRESSION</span>" if latest.regression
                      else "<span class='good'>valid</span>" if latest.valid else "<span class='bad'>invalid</span>")
            row.append(
                f"<td class='{' '.join(classes)}' data-device='{html.escape(device)}' "
                f"data-model='{html.escape(model)}' data-scheme='{html.escape(scheme)}'>"
                f"<a href='#{_cell_id(model, scheme, device)}'>"
                f"<div class='p50'>{_fmt(latest.p50_ms, '.3f', ' ms')}</div>"
                f"<div>p90 {_fmt(latest.p90_ms, '.3f', ' ms')}</div>"
                f"<div class='{speed_class}'>{_fmt(latest.speedup, '.2f', 'x')} vs onnxruntime fp32</div>"
                f"<div>{html.escape(latest.metric or 'accuracy')} {_percent(latest.accuracy)}</div>"
                f"<div class='dim'>{_runs_on(latest)}</div>"
                f"<div>{status} <span class='dim'>{len(history)} night(s)</span></div></a></td>")
        body.append("<tr>" + "".join(row) + "</tr>")
    details = []
    for (device, model, scheme), history in sorted(cells.items()):
        latest = history[0]
        reasons = "; ".join(latest.regression_detail.get("reasons", [])) if latest.regression else ""
        # Everything from the database is escaped: a shared database is as trusted as its least careful writer.
        flow_url = f"{prefect_ui.rstrip('/')}/runs/flow-run/{quote(str(latest.flow_run_id), safe='')}" \
            if prefect_ui and latest.flow_run_id else None
        flow_link = f" · <a href='{html.escape(flow_url)}'>Prefect flow run</a>" if flow_url else ""
        details.append(
            f"<section class='detail{' regression' if latest.regression else ''}' "
            f"id='{_cell_id(model, scheme, device)}'>"
            f"<h2>{html.escape(device)} · {html.escape(model)} · {html.escape(scheme)}</h2>"
            + (f"<p class='bad'>Regression: {html.escape(reasons)}</p>" if reasons else "")
            + "".join(f"<p class='slow'>board: {html.escape(mark)}</p>" for mark in _board_marks(latest))
            + f"<p class='dim'>latest run {html.escape(latest.run_id)} ({latest.created:%Y-%m-%d %H:%M} UTC) · "
            f"<a href='/runs/{html.escape(quote(latest.run_id, safe=''))}/manifest.json'>manifest</a>{flow_link}</p>"
            f"<div>{trend_svg(history)} {histogram_svg(store.samples(latest.run_id))}</div></section>")
    empty = "" if runs else "<p>No results yet: run <code>deploy run</code> or <code>deploy lab run</code>.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgedeploy device lab</title>"
            f"<style>{CSS}</style></head><body><h1>edgedeploy device lab</h1>"
            f"<p class='dim'>{len(runs)} runs · {len(devices)} devices · latest per cell; red = regression against "
            f"the cell's history · {html.escape(store.engine_url_safe())}</p>{empty}"
            f"<table class='matrix' id='matrix'><tr><th>device \\ model</th>{head}</tr>{''.join(body)}</table>"
            f"{''.join(details)}</body></html>")


class PageCache:
    """The rendered page, until the database changes (its runs' count and newest time): rendering reads every run
    and its samples, so a page per request let any client make the server re-read the whole database at will."""

    def __init__(self, store: ResultStore, prefect_ui: str | None) -> None:
        self.store, self.prefect_ui = store, prefect_ui
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._page = ""
        self.renders = 0

    def page(self) -> str:
        version = self.store.version()
        with self._lock:
            if version != self._version:
                self._page, self._version = render(self.store, prefect_ui=self.prefect_ui), version
                self.renders += 1
            return self._page


def make_handler(store: ResultStore, prefect_ui: str | None, cache: PageCache | None = None):
    cache = cache or PageCache(store, prefect_ui)

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a client that sends nothing (slowloris) is dropped, not waited on forever

        def _send(self, status: HTTPStatus, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = unquote(self.path.split("?", 1)[0])
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, cache.page(), "text/html; charset=utf-8")
            elif path.startswith("/runs/") and path.endswith("/manifest.json"):
                run_id = path[len("/runs/"):-len("/manifest.json")]
                row = store.run(run_id)
                if row is not None:
                    self._send(HTTPStatus.OK, json.dumps(row.manifest, indent=2), "application/json")
                else:
                    self._send(HTTPStatus.NOT_FOUND, "no such run", "text/plain")
            else:
                self._send(HTTPStatus.NOT_FOUND, "not found", "text/plain")

        def log_message(self, format, *args):  # quiet: the CLI says where it serves
            pass

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once: one more is closed at once, so a flood of idle
    connections can't make the server start threads without end."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(store: ResultStore, *, host: str = "127.0.0.1", port: int = 8765,
                prefect_ui: str | None = None) -> BoundedServer:
    ui = prefect_ui or os.environ.get("PREFECT_UI_URL")
    if not ui and os.environ.get("PREFECT_API_URL"):
        ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    return BoundedServer((host, port), make_handler(store, ui))
