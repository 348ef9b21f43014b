"""How the device runner hands numpy arrays to a TVM library and back: through numpy's views of TVM's own
(aligned) tensors, one memcpy each way, instead of TVM's Python copies (~15 us each: a 0.03-ms model paid more
for them than for its kernels)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from targets import device_runner
from tests.conftest import conv_model, tvm_build


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner-io")
    onnx.save(conv_model(), str(tmp / "m.onnx"))
    return tvm_build(tmp / "m.onnx", tmp).library_path


def _reference(library, x):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_outputs_are_the_callers_own_and_equal_tvms_copies(library):
    run, _, _ = device_runner.load_tvm(library)
    rows = np.random.default_rng(0).random((6, 3, 8, 8), dtype=np.float32)
    first = run([rows[0:1]])[0]
    kept = first.copy()
    second = run([rows[3:4]])[0]  # the same staged input tensor, refilled; a new output
    assert first.flags.owndata and second.flags.owndata
    np.testing.assert_array_equal(first, kept)  # a later call never writes into an earlier output
    np.testing.assert_array_equal(first, _reference(library, rows[0:1]))
    np.testing.assert_array_equal(second, _reference(library, rows[3:4]))
    assert not np.array_equal(first, second)


def test_a_feed_that_is_not_contiguous_is_copied_in_whole(library):
    run, _, _ = device_runner.load_tvm(library)
    x = np.asfortranarray(np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32))
    np.testing.assert_array_equal(run([x])[0], _reference(library, np.ascontiguousarray(x)))


def test_loading_a_library_leaves_the_environment_alone(library, monkeypatch):
    """Regression: load_tvm set TVM_USE_RUNTIME_LIB in its process; called inside a test worker, every later deploy
    subprocess of that worker loaded TVM's runtime alone and failed to import its compiler (21 tests, 2026-12-07).
    The runner's main() sets it, for its own process only."""
    import os

    for name in ("TVM_USE_RUNTIME_LIB", "TVM_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    device_runner.load_tvm(library)
    assert dict(os.environ) == before


def test_without_dlpack_in_numpy_the_runner_falls_back_to_tvms_copies(library, monkeypatch):
    """numpy < 1.22 (a JetPack 4 board's 1.19) has no from_dlpack: the same results through copyfrom/.numpy()."""
    monkeypatch.delattr(np, "from_dlpack")
    run, _, _ = device_runner.load_tvm(library)
    x = np.random.default_rng(2).random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(run([x])[0], _reference(library, x))
