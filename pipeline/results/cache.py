"""A content-addressed cache of quantized models and compiled libraries.

The key is what determines the output: the model's hash, the scheme, the calibration data, the
profile, the tool versions (never a run id). An entry is a directory whose `result.json` (the
stage's JSON result) is written last, by an atomic rename: a run killed midway leaves an entry
without it, which the next run rebuilds; earlier entries are never touched. A lock per key keeps
two runs from building the same entry at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

Result = TypeVar("Result", bound=BaseModel)


def cache_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """Hash of array contents (an .npz file's bytes carry zip timestamps, so they can't be the key)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(directory.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_or_build(self, stage: str, key: str, model: type[Result],
                     build: Callable[[Path], Result]) -> tuple[Result, bool]:
        """(result, True) from the cache, or (build(directory), False) stored for next time."""
        directory = self.root / stage / key
        marker = directory / "result.json"
        with self._locked(directory):
            if marker.is_file():
                return model.model_validate_json(marker.read_text()), True
            if directory.exists():  # a build that was killed midway: start it over
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            result = build(directory)
            partial = directory / "result.json.partial"
            partial.write_text(result.model_dump_json(indent=2))
            os.replace(partial, marker)
        return result, False
