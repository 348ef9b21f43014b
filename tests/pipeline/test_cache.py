"""The artifact cache: hits, misses, and a build killed midway."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel

from pipeline.results.cache import ArtifactCache, arrays_sha256, cache_key


class Built(BaseModel):
    path: str


def _build(directory):
    (directory / "artifact.bin").write_bytes(b"compiled")
    return Built(path=str(directory / "artifact.bin"))


def test_second_call_is_a_hit(tmp_path):
    cache = ArtifactCache(tmp_path)
    key = cache_key(model="abc", scheme="int8")
    first, hit1 = cache.get_or_build("compiled", key, Built, _build)
    second, hit2 = cache.get_or_build("compiled", key, Built, lambda d: pytest.fail("rebuilt a cached entry"))
    assert (hit1, hit2) == (False, True) and first == second


def test_any_change_in_the_key_recomputes(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.get_or_build("compiled", cache_key(model="abc", tools={"tvm": "0.27"}), Built, _build)
    _, hit = cache.get_or_build("compiled", cache_key(model="abc", tools={"tvm": "0.28"}), Built, _build)
    assert not hit


def test_a_build_killed_midway_is_rebuilt_and_earlier_entries_survive(tmp_path):
    cache = ArtifactCache(tmp_path)
    done, _ = cache.get_or_build("compiled", cache_key(n=1), Built, _build)

    def dies(directory):
        (directory / "half.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # the process is stopped mid-compile

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("compiled", cache_key(n=2), Built, dies)
    again, hit = cache.get_or_build("compiled", cache_key(n=2), Built, _build)
    assert not hit and not (tmp_path / "compiled" / cache_key(n=2) / "half.bin").exists()
    assert cache.get_or_build("compiled", cache_key(n=1), Built, _build) == (done, True)


def test_array_hash_ignores_file_timestamps_but_not_content():
    a = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    assert arrays_sha256(a) == arrays_sha256({"x": a["x"].copy()})
    assert arrays_sha256(a) != arrays_sha256({"x": a["x"] + 1})
