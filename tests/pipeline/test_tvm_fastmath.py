"""exp and sigmoid as vector code: as accurate as float32 needs, no libm call per element, and a module's
sigmoid/exp ops replaced without changing what it computes."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

from pipeline.compiler.passes.fastmath import fast_exp, fast_math, fast_sigmoid  # noqa: E402

CPU = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _vectorized(scalar, n: int):
    """A kernel applying ``scalar`` to n floats, 16 lanes at a time (as a tuned kernel would)."""
    from tvm import s_tir

    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: scalar(x[i]), name="y")
    schedule = s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = schedule.get_loops(schedule.get_sblock("y"))
    _, lanes = schedule.split(loop, [None, 16])
    schedule.vectorize(lanes)
    return tvm.compile(schedule.mod, target=CPU)


def _run(library, x: np.ndarray) -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros_like(x))
    library(tvm.runtime.tensor(x), out)
    return out.numpy()


def _assembly(library) -> str:
    return "\n".join(m.inspect_source("asm") for m in [library.mod, *library.mod.imports] if m.kind == "llvm")


def test_fast_exp_and_sigmoid_are_float32_accurate_and_saturate():
    x = np.concatenate([np.linspace(-87, 87, 100_000), [-1e4, -100, -88.5, 0, 88.5, 100, 1e4]]).astype(np.float32)
    exp = _run(_vectorized(fast_exp, x.size), x)
    sigmoid = _run(_vectorized(fast_sigmoid, x.size), x)
    in_range = np.abs(x) < 87
    truth = np.exp(x[in_range].astype(np.float64))
    assert np.max(np.abs(exp[in_range] - truth) / truth) < 2e-7
    truth = 0.5 * (1 + np.tanh(x.astype(np.float64) / 2))  # the sigmoid, without overflowing
    assert np.max(np.abs(sigmoid - truth)) < 2e-7
    assert np.all(np.isfinite(sigmoid)) and sigmoid[x == -1e4] == 0 and sigmoid[x == 1e4] == 1


def test_the_kernels_are_vector_code_where_tvms_own_call_libm_per_element():
    """The point of the module: TVM's exp becomes one expf call per lane; the fast one none."""
    from tvm import tirx

    n = 1024
    assert "expf" in _assembly(_vectorized(tirx.exp, n))  # what this replaces (if LLVM learns, drop this module)
    for scalar in (fast_exp, fast_sigmoid):
        assembly = _assembly(_vectorized(scalar, n))
        assert "expf" not in assembly
        assert "mulps" in assembly  # packed (vector) float multiplies


def _silu_module(shape: tuple[int, ...]) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            silu = bb.emit(relax.op.multiply(x, relax.op.sigmoid(x)))
            out = bb.emit_output(relax.op.add(silu, relax.op.exp(relax.op.negative(x))))
        bb.emit_func_output(out)
    return bb.get()


def test_fast_math_replaces_sigmoid_and_exp_and_computes_the_same():
    mod = _silu_module((2, 8, 8, 16))
    fast, replaced = fast_math(mod)
    assert replaced == 2
    names = {gvar.name_hint for gvar in fast.get_global_vars()}
    assert {"fast_sigmoid", "fast_exp"} <= names
    run_before, run_after = (relax.VirtualMachine(tvm.compile(m, target=CPU), tvm.cpu())["main"] for m in (mod, fast))
    x = np.random.default_rng(0).uniform(-10, 10, (2, 8, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(run_after(tvm.runtime.tensor(x)).numpy(), run_before(tvm.runtime.tensor(x)).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_fast_math_leaves_other_dtypes_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float16"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.sigmoid(x))
        bb.emit_func_output(out)
    _, replaced = fast_math(bb.get())
    assert replaced == 0


def test_the_polynomial_cross_compiled_for_a_pi4_computes_the_same_on_aarch64(tmp_path):
    """fast_math runs for every CPU profile: the NEON build of the polynomial, run by arm64 Python (qemu), must
    compute what float32 needs there too (the x86 tests above never see its aarch64 code)."""
    import subprocess

    from targets.profiles import load_profile
    from tests.lab import aarch64_python

    python = aarch64_python()
    if python is None:
        pytest.skip("no arm64 Python under qemu here (scripts/make_aarch64_root.sh builds it)")
    pi4 = load_profile("raspberry-pi-4")
    fast, replaced = fast_math(_silu_module((2, 8, 8, 16)))
    assert replaced == 2
    library = tmp_path / "silu.so"
    tvm.compile(fast, target=tvm.target.Target(pi4.tvm_target())).export_library(str(library),
                                                                                    cc=pi4.cross_compiler)
    x = np.random.default_rng(0).uniform(-10, 10, (2, 8, 8, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import numpy as np, tvm\nfrom tvm import relax\n"
              f"vm = relax.VirtualMachine(tvm.runtime.load_module({str(library)!r}), tvm.cpu())\n"
              f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, vm['main'](tvm.runtime.tensor(x)).numpy())\n")
    done = subprocess.run([*python, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    x64 = x.astype(np.float64)
    truth = x64 * 0.5 * (1 + np.tanh(x64 / 2)) + np.exp(-x64)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), truth, rtol=1e-6, atol=1e-6)


def _requantize_module(shape: tuple[int, ...], rescale: np.ndarray, scales: tuple[float, float]) -> tvm.IRModule:
    """int32 accumulator -> * rescale -> quantize (scale 0) -> dequantize -> sigmoid -> quantize (scale 1): the
    arithmetic pipeline.compiler.passes.layout leaves of a QDQ int8 conv's epilogue."""
    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType(shape, "int32"))

    def quantize(x, scale):
        rounded = relax.op.round(relax.op.divide(x, relax.const(np.full([1] * len(shape), scale, np.float32))))
        return relax.op.astype(relax.op.clip(relax.op.add(rounded, relax.const(128.0)), 0, 255), "uint8")

    with bb.function("main", [acc]):
        with bb.dataflow():
            y = bb.emit(quantize(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(rescale)), scales[0]))
            dq = relax.op.multiply(relax.op.subtract(relax.op.astype(y, "float32"), relax.const(128.0)),
                                   relax.const(np.float32(scales[0])))
            out = bb.emit_output(quantize(relax.op.sigmoid(dq), scales[1]))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod: tvm.IRModule) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and names.append(e.op.name))
    return names


def test_requantization_multiplies_by_the_reciprocal_and_lands_on_the_same_steps():
    from pipeline.compiler.passes.fastmath import multiply_by_reciprocal

    shape = (1, 8, 8, 32)
    rng = np.random.default_rng(1)
    rescale = rng.uniform(1e-4, 3e-4, (1, 1, 1, 32)).astype(np.float32)  # sx * sw, per output channel
    mod = _requantize_module(shape, rescale, (0.047, 1 / 255))
    fast, rewritten = multiply_by_reciprocal(mod)
    assert rewritten == 2
    ops = _ops(fast)
    assert "relax.divide" not in ops
    assert ops.count("relax.multiply") == 3  # the joined rescale, the dequantize's, the sigmoid quantize's
    before, after = (relax.VirtualMachine(tvm.compile(m, target=CPU), tvm.cpu())["main"] for m in (mod, fast))
    acc = rng.integers(-60_000, 60_000, (4, *shape), dtype=np.int32)
    ours = np.stack([after(tvm.runtime.tensor(a)).numpy() for a in acc]).astype(int)
    theirs = np.stack([before(tvm.runtime.tensor(a)).numpy() for a in acc]).astype(int)
    # Only elements within a last bit of a rounding tie may move, and by one step.
    assert np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 1e-3
