"""The house rules the import contracts (pyproject's [tool.importlinter], run by `make test`) can't express."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("edgedeploy", "pipeline", "targets", "flows", "tests", "bench", "scripts")
# The project's own files: tracked or not yet, never what .gitignore keeps out (bench/gpu_check/bundle holds a copy
# of TVM's Python package).
SOURCES = [REPO / name for name in subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *FOLDERS], cwd=REPO, capture_output=True,
    text=True, check=True).stdout.splitlines() if name.endswith(".py") and (REPO / name).is_file()]
MAX_LINES = 500


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert SOURCES
    assert not long, f"split these (at most {MAX_LINES} lines a file): {long}"


def _importers(*packages: str) -> list[str]:
    """The project's own modules (not tests, bench or scripts) that import any of ``packages`` or below them."""
    code = [p for p in SOURCES if p.parts[len(REPO.parts)] in ("edgedeploy", "pipeline", "targets", "flows")]
    return sorted(str(p.relative_to(REPO)) for p in code
                  if any(m == a or m.startswith(a + ".") for m in _imported_modules(p) for a in packages))


def test_only_the_quantize_stage_imports_onnxruntime_quantization():
    """import-linter sees external packages only whole (onnxruntime), so this one is checked here."""
    assert _importers("onnxruntime.quantization") == ["pipeline/quantize.py"]


def test_only_the_lab_flow_talks_to_prefects_server_api():
    """Flows use Prefect as a library (@flow, @task); only the lab talks to its server's API (concurrency limits, work
    pools, deployments, artifacts)."""
    api = ("prefect.client", "prefect.server", "prefect.deployments", "prefect.concurrency", "prefect.artifacts")
    assert _importers(*api) == ["flows/lab.py"]


def test_the_readme_is_a_users_document_and_its_links_resolve():
    """At most 300 lines (measurements and internals go to docs/), and every relative link points at a file."""
    import re

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "move detail into docs/"
    for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", readme):
        assert (REPO / target).is_file(), target
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
