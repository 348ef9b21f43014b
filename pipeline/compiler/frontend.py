"""The model into TVM Relax for the profile's target: its target, the ONNX import, and the passes (passes/) that
rewrite it, one ``tvm.transform.Sequential``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
import tvm
from tvm.relax.frontend import onnx as onnx_frontend

from pipeline.compiler.passes.dot import (
    AVX2,
    AVX512BW,
    NEON,
    SDOT,
    VNNI,
    DotLayout,
    dot_convs,
)
from pipeline.compiler.passes.fastmath import fast_math, multiply_by_reciprocal
from pipeline.compiler.passes.int8 import drop_float_round_trips, integerize
from pipeline.compiler.passes.layout import channels_last
from pipeline.compiler.passes.winograd import winograd_convs
from pipeline.compiler.threads import tag_scope_per_thread
from pipeline.ingest import ModelInfo
from pipeline.quantize import QuantizedModel
from targets.profiles import DeviceProfile

tag_scope_per_thread()  # every build starts here; a lab builds for its devices in threads at once


def resolve_target(profile: DeviceProfile) -> dict[str, Any]:
    """The profile's CPU target with a host-detected mcpu filled in (the `local` profile leaves it open)."""
    target = profile.tvm_target()
    if "mcpu" not in target:
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    return target


def dot_layout(profile: DeviceProfile) -> DotLayout | None:
    """The int8 dot-product instruction the profile's CPU kernels are laid out for (passes.dot), the best its CPU
    has: on x86 AVX-512 VNNI's vpdpbusd, else AVX-512BW's or AVX2's vpmaddubsw; on aarch64 sdot where LLVM's target
    has dotprod (mcpu cortex-a76, or +dotprod), else NEON's smull. None for a GPU build (its integer kernels are
    CUDA's) and for an x86 CPU older than AVX2."""
    if profile.tvm_gpu_target():
        return None
    target = tvm.target.Target(resolve_target(profile))
    if profile.cpu.arch == "x86_64":  # what LLVM's target has (its mcpu, mattr), which is what the code may use

        def has(feature: str) -> bool:
            return bool(tvm.target.codegen.target_has_features([feature], target))

        return VNNI if has("avx512vnni") else AVX512BW if has("avx512bw") else AVX2 if has("avx2") else None
    if profile.cpu.arch == "aarch64":
        return SDOT if target.features.has_dotprod else NEON
    return None


@dataclass
class PassLog:
    """What the passes of one Sequential left behind: what each counted (e.g. how many ops became integer kernels),
    by pass name, and the exception one raised (TVM hands it back as a RuntimeError with its message only)."""

    counts: dict[str, int] = field(default_factory=dict)
    raised: BaseException | None = None


def _module_pass(name: str, rewrite: Callable[..., Any], log: PassLog,
                 when: Callable[[], bool] = lambda: True) -> tvm.transform.Pass:
    """A rewrite of ours as a TVM module pass; what it counts (a rewrite that returns ``(mod, n)``) goes into the
    log, and ``when()`` is asked as the pass runs, so a pass can depend on what an earlier one found."""

    def run(mod: tvm.IRModule, _context) -> tvm.IRModule:
        if not when():
            return mod
        try:
            out = rewrite(mod)
        except BaseException as exc:
            log.raised = exc
            raise
        if isinstance(out, tuple):
            out, log.counts[name] = out
        return out

    return tvm.transform.module_pass(run, opt_level=0, name=name)


def rewrites(profile: DeviceProfile, *, int8: bool, log: PassLog) -> tvm.transform.Sequential:
    """The passes for the profile's target, in order (``int8``: a QDQ model)."""
    dot, cpu = dot_layout(profile), not profile.tvm_gpu_target()

    def integer_ops() -> bool:
        return bool(log.counts.get("Integerize"))

    passes = []
    if int8:  # before anything folds the int8 weights into float constants: QDQ conv/matmul -> integer kernels
        passes.append(_module_pass("Integerize", functools.partial(integerize, dot=dot, narrow_convs_in_float=cpu),
                                   log))
    if cpu:
        passes += [
            # rounding to 8 bits only where an integer kernel reads the tensor (passes.int8)
            _module_pass("DropFloatRoundTrips", drop_float_round_trips, log, when=integer_ops),
            # CPU kernels vectorize along contiguous channels (passes.layout)
            _module_pass("ChannelsLast", channels_last, log),
            _module_pass("DotProductConvs", functools.partial(dot_convs, layout=dot), log,
                         when=lambda: integer_ops() and dot is not None),
            # float 3x3 convs with 4x fewer multiply-adds (untuned, its transforms take default schedules too)
            _module_pass("WinogradConvs", winograd_convs, log),
            # sigmoid/exp as vector code, not a libm call per element (passes.fastmath)
            _module_pass("FastMath", fast_math, log),
            # requantize with one multiply, not a divide per element (same module)
            _module_pass("MultiplyByReciprocal", multiply_by_reciprocal, log),
        ]
    return tvm.transform.Sequential(passes, opt_level=0, name="edgedeploy.rewrites")


def relax_module(quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile) -> tuple[tvm.IRModule, int]:
    """The model as the profile's target will run it, and how many of its ops became integer kernels."""
    model = onnx.load(quantized.path)
    shape_dict = {spec.name: list(spec.shape) for spec in info.inputs}
    mod = onnx_frontend.from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
    log = PassLog()
    try:
        mod = rewrites(profile, int8=quantized.config.scheme == "int8", log=log)(mod)
    except Exception:
        if log.raised is not None:  # the pass's own exception, not TVM's wrapper of it
            raise log.raised from None
        raise
    return mod, log.counts.get("Integerize", 0)


@functools.cache
def tvm_importable_ops() -> frozenset[str]:
    """ONNX op types TVM's Relax frontend can import (its converter table)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return frozenset(_get_convert_map())
