"""Stage 2 of 8, check: hold the requested scheme and runtime against the device, before any work.

Every check returns pass / warn / refuse with the reason in a user's words and the hardware or
compiler fact it rests on (../shared/notes/hardware.md), so a refusal can be trusted and
argued with. `deploy check` prints them; `deploy run` stops before quantizing on a refusal.
"""

from __future__ import annotations

import onnx

from pipeline.checks_x86 import check_ort_int8_x86, check_qdq_weights_x86, has_vpmaddubsw
from pipeline.graph_stats import every_node, function_calls
from pipeline.ingest import ModelInfo
from pipeline.opset import converted, model_opset, ort_max_ir, ort_max_opset, with_ir
from pipeline.quantize import QuantConfig
from pipeline.verdicts import CheckReport, CheckResult, Runtime
from targets.host import Toolchain, detect_toolchain
from targets.profiles import HOW_TO_INSTALL, TVM_MIN_PYTHON, DeviceProfile

# onnxruntime's quantizer writes these ("QOperator" format); TVM 0.27's ONNX importer has none of them.
QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QAttention",
})
# Dynamic quantization (quantize_dynamic) writes these: activations quantized on every run, integer kernels after.
DYNAMIC_QUANT_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})

# Resident memory of a runtime with nothing loaded (Python + numpy + the runtime): measured on x86-64 with the
# device runner for the CPU runtimes; for the GPU ones, a CUDA context with cuDNN/cuBLAS (and TensorRT's builder)
# as commonly reported on Jetsons. An estimate for the fit check, not a guarantee.
RUNTIME_OVERHEAD_MB = {"tvm": 180, "onnxruntime": 120, "onnxruntime-cuda": 700, "onnxruntime-tensorrt": 900}
TVM_CUDA_OVERHEAD_MB = 350


def _unit(profile: DeviceProfile, runtime: Runtime) -> tuple[str, tuple[str, ...]]:
    """The unit ``runtime`` computes on, in words, and its native precisions."""
    if profile.unit_of(runtime) == "gpu" and profile.gpu:
        return f"{profile.name}'s GPU ({profile.gpu.name}, compute capability {profile.gpu.compute_capability})", \
            profile.gpu.precisions
    return f"{profile.name}'s CPU ({profile.cpu.mcpu or 'this host'})", profile.cpu.precisions


def check_precision(profile: DeviceProfile, quant: QuantConfig, runtime: Runtime = "tvm") -> CheckResult:
    unit, precisions = _unit(profile, runtime)
    name = "precision vs arithmetic"
    if quant.scheme == "fp32":
        return CheckResult(check=name, verdict="pass", reason=f"fp32 runs natively on {unit}")
    if quant.scheme == "fp16":
        if "fp16" in precisions:
            return CheckResult(check=name, verdict="pass", reason=f"{unit} has native fp16 arithmetic")
        return CheckResult(
            check=name, verdict="refuse",
            reason=f"fp16 needs fp16 arithmetic on the unit that runs the model ({runtime}: {unit}), and it has "
                   "none: every op would convert to fp32 and back, slower than plain fp32",
            fact="fp16 arithmetic: Jetson Nano GPU yes, its CPU no; Raspberry Pi 4 no, Pi 5 yes (ARMv8.2 FP16); "
                 "x86 AVX2/VNNI no (F16C only converts)",
            fix="use --quant fp32, or --quant int8 to cut memory" + (
                "; or a GPU runtime (--runtime onnxruntime-tensorrt)" if profile.gpu and "fp16" in
                profile.gpu.precisions else ""),
        )
    gpu = profile.gpu if profile.unit_of(runtime) == "gpu" else None
    if quant.scheme == "dynamic":
        return _dynamic_precision(name, unit, runtime, profile)
    if gpu is not None:
        if not gpu.has_dp4a:
            return CheckResult(
                check=name, verdict="refuse",
                reason=f"int8 has no fast path on {unit}: it would run slower than fp16",
                fact=f"int8 on NVIDIA GPUs needs DP4A, from compute capability 6.1; compute capability "
                     f"{gpu.compute_capability} has none, and TensorRT offers no int8 there",
                fix="use --quant fp16 (native on this GPU)" if "fp16" in gpu.precisions else "use --quant fp32",
            )
        if runtime == "onnxruntime-cuda":
            return CheckResult(
                check=name, verdict="warn",
                reason="onnxruntime's CUDA provider runs few QDQ int8 ops as int8: most run in float, some on the CPU",
                fact="onnxruntime's int8 on NVIDIA GPUs is TensorRT's (explicit quantization of QDQ models)",
                fix="--runtime onnxruntime-tensorrt for int8 on this GPU",
            )
        return CheckResult(check=name, verdict="pass", reason=f"{unit} has DP4A int8 dot products")
    if profile.cpu.int8_dot_product:
        return CheckResult(check=name, verdict="pass", reason=f"{unit} has an int8 dot-product instruction")
    if runtime == "tvm" and has_vpmaddubsw(profile):
        return CheckResult(check=name, verdict="pass",
                           reason=f"{unit} has no VNNI; TVM lays its int8 kernels out for VPMADDUBSW (32 uint8 x int8 "
                                  "products an instruction with AVX2, 64 with AVX-512BW; 7-bit weights)")
    return CheckResult(
        check=name, verdict="warn",
        reason=f"{unit} has no int8 dot-product instruction: int8 cuts weight memory 4x, but the speed-up will be "
               "small or negative",
        fact="int8 dot products: x86 VNNI (VPDPBUSD) or ARMv8.2 dotprod (SDOT/UDOT); Cortex-A57/A72 and AVX2-only "
             "x86 have neither",
    )


def _dynamic_precision(name: str, unit: str, runtime: Runtime, profile: DeviceProfile) -> CheckResult:
    """Dynamic quantization: onnxruntime's CPU scheme (DynamicQuantizeLinear, MatMulInteger, ConvInteger)."""
    if runtime == "tvm":
        return CheckResult(
            check=name, verdict="refuse",
            reason="dynamic quantization runs in onnxruntime only: TVM can't import its ops (DynamicQuantizeLinear, "
                   "MatMulInteger, ConvInteger)",
            fact="TVM 0.27's ONNX importer reads static QDQ models; dynamic quantization's integer ops are not in "
                 "its table",
            fix="add --runtime onnxruntime, or use --quant int8 (static, with calibration data) for TVM",
        )
    if profile.unit_of(runtime) == "gpu":
        return CheckResult(
            check=name, verdict="refuse",
            reason=f"dynamic quantization is a CPU scheme of onnxruntime: {runtime} would run its ops on the CPU or "
                   "not at all",
            fact="TensorRT parses static QDQ int8 only; onnxruntime's dynamic ops (DynamicQuantizeLinear) are CPU "
                 "kernels",
            fix="use --runtime onnxruntime (the CPU), or --quant fp16 on the GPU",
        )
    if profile.cpu.int8_dot_product:
        return CheckResult(check=name, verdict="pass", reason=f"{unit} has an int8 dot-product instruction")
    return CheckResult(check=name, verdict="warn",
                       reason=f"{unit} has no int8 dot-product instruction: dynamic int8 cuts weight memory 4x, the "
                              "speed-up will be small (each run also quantizes the activations)")


def check_prequantized(info: ModelInfo, quant: QuantConfig) -> tuple[CheckResult, QuantConfig]:
    """A model that is QDQ int8 already runs as it is: int8, never quantized twice, no calibration data needed."""
    name = "already quantized"
    if not info.prequantized:
        return CheckResult(check=name, verdict="pass", reason="not applicable: a float model"), quant
    adjusted = QuantConfig(scheme="int8", prequantized=True)
    asked = "" if quant.scheme in ("int8", "fp32") else f" (--quant {quant.scheme} asked: it stays int8)"
    result = CheckResult(
        check=name, verdict="pass" if not asked else "warn",
        reason=f"the model is QDQ int8 already: used as it is, not quantized again, no calibration data needed; TVM "
               f"compiles it with its integer kernels{asked}",
        fact="QuantizeLinear/DequantizeLinear pairs around the weights: a QAT export or another tool's output")
    return result, adjusted


def check_trt_int8(quant: QuantConfig, runtime: Runtime) -> tuple[CheckResult, QuantConfig]:
    """TensorRT's int8 is symmetric (zero points 0) and reads QDQ: the quantization is adjusted to S8S8 with
    symmetric activations, QDQ."""
    name = "int8 format for TensorRT"
    if quant.scheme != "int8" or quant.prequantized or runtime != "onnxruntime-tensorrt":
        return CheckResult(check=name, verdict="pass", reason="not applicable"), quant
    adjusted = quant.model_copy(update={"activation_type": "int8", "symmetric_activations": True, "format": "qdq"})
    if adjusted == quant:
        return CheckResult(check=name, verdict="pass", reason="S8S8 QDQ with symmetric activations"), quant
    return CheckResult(
        check=name, verdict="warn", reason="TensorRT reads symmetric int8 QDQ only: using S8S8 with symmetric "
        "activations", fact="TensorRT's explicit quantization: QuantizeLinear/DequantizeLinear with int8 and zero "
        "point 0"), adjusted


def check_format(model: onnx.ModelProto, runtime: Runtime) -> CheckResult:
    name = "quantized format vs compiler"
    bad = [p for p in every_node(model) if p.node.op_type in QOPERATOR_OPS | DYNAMIC_QUANT_OPS]
    if runtime != "tvm" or not bad:
        return CheckResult(check=name, verdict="pass", reason="no QOperator or dynamically quantized Conv nodes"
                           if not bad else "onnxruntime runs QOperator and ConvInteger nodes")
    kinds = sorted({p.node.op_type for p in bad})
    return CheckResult(
        check=name, verdict="refuse",
        reason=f"{len(bad)} node(s) in a quantized format TVM can't import ({', '.join(kinds)})",
        fact="TVM 0.27's ONNX importer reads QDQ (QuantizeLinear/DequantizeLinear) models only; QOperator ops "
             "(QLinearConv, QGemm, ...) and ConvInteger (dynamic quantization of Conv) are not in its table",
        fix="run this model with onnxruntime, or give the fp32 model with --quant int8 (static QDQ)",
        nodes=[p.named() for p in bad[:20]],
    )


def check_op_coverage(model: onnx.ModelProto, runtime: Runtime, importable: frozenset[str]) -> CheckResult:
    """Every op TVM must import, wherever it is: the main graph, If/Loop/Scan bodies, the model's functions (named
    with where it sits: an LSTM inside an If is refused as LSTM, not as If)."""
    name = "op coverage"
    if runtime == "tvm":
        calls = function_calls(model)
        missing = [p for p in every_node(model)
                   if (p.node.domain not in ("", "ai.onnx") or p.node.op_type not in importable)
                   and (p.node.domain, p.node.op_type) not in calls
                   and p.node.op_type not in QOPERATOR_OPS | DYNAMIC_QUANT_OPS]  # said by check_format
        if missing:
            return CheckResult(
                check=name, verdict="refuse",
                reason=f"{len(missing)} node(s) TVM can't import: "
                       f"{', '.join(sorted({p.node.op_type for p in missing}))}",
                fact="TVM 0.27's ONNX converter table has 164 ops; not LSTM/GRU/RNN, not com.microsoft contrib ops",
                fix="run the model with onnxruntime, or replace these ops before export",
                nodes=[p.named() for p in missing[:20]],
            )
    return CheckResult(check=name, verdict="pass", reason=f"every op is importable by {runtime}")


def check_opset(model: onnx.ModelProto, profile: DeviceProfile, runtime: Runtime = "tvm") -> CheckResult:
    """The opset against the device's onnxruntime: the one that runs the model (a GPU provider's build), else the
    CPU one that runs the fp32 baseline."""
    name = "opset vs device onnxruntime"
    version = profile.onnxruntime_for(runtime)
    opset = model_opset(model)
    if version is None:
        return CheckResult(check=name, verdict="warn",
                           reason="no onnxruntime on the device: the fp32 baseline can't be measured there",
                           fix="install onnxruntime on the device and set runtimes.onnxruntime in the profile")
    newest = ort_max_opset(version)
    if newest is not None and opset > newest:
        what = _loaded_by_onnxruntime(runtime)
        fact = "onnxruntime's compatibility table: each release runs ONNX opsets up to a fixed version"
        if converted(model, newest) is not None:
            return CheckResult(check=name, verdict="warn", fact=fact,
                               reason=f"the model uses opset {opset}; onnxruntime {version} on the device runs up to "
                                      f"{newest}: {what} go there converted to opset {newest} (onnx's version "
                                      "converter)")
        return CheckResult(
            check=name, verdict="warn", fact=fact,
            reason=f"the model uses opset {opset}; onnxruntime {version} on the device runs up to opset {newest}, and "
                   f"onnx's version converter can't take it down: {what} won't load there",
            fix=f"re-export with opset <= {newest}, or update onnxruntime on the device",
        )
    return CheckResult(check=name, verdict="pass", reason=f"opset {opset} runs on onnxruntime {version}")


def check_ir_version(model: onnx.ModelProto, profile: DeviceProfile, runtime: Runtime = "tvm") -> CheckResult:
    """The model's IR version against the device's onnxruntime (the one that runs the model, else the baseline's)."""
    name = "IR version vs device onnxruntime"
    version = profile.onnxruntime_for(runtime)
    newest = ort_max_ir(version)
    if newest is None or model.ir_version <= newest:
        known = f" reads on onnxruntime {version}" if newest is not None else " (the device's limit is not known)"
        return CheckResult(check=name, verdict="pass", reason=f"IR version {model.ir_version}{known}")
    what = _loaded_by_onnxruntime(runtime)
    fact = "each onnxruntime release reads ONNX IR versions up to the one of the onnx it was built with"
    if with_ir(model, newest) is not None:
        return CheckResult(check=name, verdict="warn", fact=fact,
                           reason=f"the model is saved with IR version {model.ir_version}; onnxruntime {version} "
                                  f"reads up to {newest}, and nothing in it needs more: {what} go there as IR {newest}")
    return CheckResult(check=name, verdict="warn", fact=fact,
                       reason=f"the model is saved with IR version {model.ir_version} and uses what onnxruntime "
                              f"{version} (IR <= {newest}) can't read: {what} won't load there",
                       fix="save the model with an older onnx, or update onnxruntime on the device")


def _loaded_by_onnxruntime(runtime: Runtime) -> str:
    """What of a run onnxruntime loads on the device: the artifact too, when the runtime is one of its own."""
    return "the model and the fp32 baseline" if runtime.startswith("onnxruntime") else "the fp32 baseline"


def check_memory(info: ModelInfo, profile: DeviceProfile, quant: QuantConfig, runtime: Runtime) -> CheckResult:
    name = "memory fit"
    weight_factor = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25, "dynamic": 0.25}[quant.scheme]
    weights_mb = info.weight_bytes * weight_factor / 2**20
    activations_mb = info.peak_activation_bytes / 2**20
    overhead = RUNTIME_OVERHEAD_MB[runtime] + (TVM_CUDA_OVERHEAD_MB if runtime == "tvm" and
                                               profile.unit_of(runtime) == "gpu" else 0)
    need = weights_mb + activations_mb + overhead
    have = profile.memory_mb
    detail = (f"weights {weights_mb:.1f} MB + peak activations {activations_mb:.1f} MB + {runtime} overhead "
              f"~{overhead} MB = {need:.0f} MB of {have} MB")
    shared = " (shared between CPU and GPU)" if profile.gpu else ""
    if need > have:
        return CheckResult(check=name, verdict="refuse", blocks="run",
                           reason=f"the model doesn't fit: {detail}{shared}",
                           fact="weights + peak activations + runtime overhead must fit the device's memory",
                           fix="quantize (int8 cuts weights 4x) or use a smaller input shape")
    if need > 0.8 * have:
        return CheckResult(check=name, verdict="warn", reason=f"tight: {detail}{shared}; the OS needs room too")
    return CheckResult(check=name, verdict="pass", reason=detail)


def check_runtime(profile: DeviceProfile, runtime: Runtime) -> CheckResult:
    name = "runtime on the device"
    py = tuple(int(x) for x in profile.python_version.split("."))
    if py < (3, 6):
        return CheckResult(check=name, verdict="refuse", blocks="run",
                           reason=f"the device runner needs Python >= 3.6; {profile.name} has {profile.python_version}",
                           fix="install Python 3.6+ on the device")
    spec = profile.runtimes.get(runtime)
    unit = profile.unit_of(runtime)
    if unit == "gpu" and profile.gpu is None:
        where = "this machine (nvidia-smi found none)" if profile.connection.transport == "local" else profile.name
        return CheckResult(
            check=name, verdict="refuse", blocks="build",
            reason=f"{runtime} runs on an NVIDIA GPU, and {where} has none",
            fact="onnxruntime's CUDA and TensorRT providers need an NVIDIA GPU and its driver",
            fix="use --runtime onnxruntime or --runtime tvm here, or a profile of a board with an NVIDIA GPU",
        )
    if spec is None or not profile.has_runtime(runtime):
        wheel_note = (f" TVM 0.27 needs Python >= {'.'.join(map(str, TVM_MIN_PYTHON))}; this device has "
                      f"{profile.python_version} ({profile.os})") if runtime == "tvm" and py < TVM_MIN_PYTHON else ""
        others = [r for r in ("onnxruntime-tensorrt", "onnxruntime-cuda", "tvm", "onnxruntime")
                  if r != runtime and (s := profile.runtimes.get(r)) and s.version]
        return CheckResult(
            check=name, verdict="refuse", blocks="run",
            reason=f"{runtime} is not on {profile.name}: the artifact couldn't be run there.{wheel_note}",
            fact="the device-side runner runs the artifact with the device's own runtime",
            fix=HOW_TO_INSTALL[runtime] + (f"; or use --runtime {others[0]}" if others else ""),
        )
    trt = f" (TensorRT {spec.tensorrt})" if spec.tensorrt else ""
    return CheckResult(check=name, verdict="pass", reason=f"{runtime} {spec.version}{trt} on the {unit.upper()} and "
                       f"Python {profile.python_version} on {profile.name}")


def check_toolchain(profile: DeviceProfile, toolchain: Toolchain) -> CheckResult:
    name = "build toolchain"
    notes = []
    if profile.cpu.arch != toolchain.arch:
        compiler = profile.cross_compiler
        if not compiler or not toolchain.has(compiler):
            return CheckResult(
                check=name, verdict="refuse",
                reason=f"{profile.name} is {profile.cpu.arch} and this machine is {toolchain.arch}: the library needs "
                       f"a cross linker ({compiler or 'none set in the profile'}), which is not installed",
                fact="TVM emits object code for the target; linking it into a shared library needs that arch's gcc",
                fix="make setup (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross), and set "
                    "cross_compiler in the profile",
            )
        notes.append(f"cross-linked with {compiler}")
    if profile.unit_of("tvm") == "gpu" and profile.gpu:
        sm = profile.gpu.sm
        if toolchain.cuda is None:
            return CheckResult(
                check=name, verdict="refuse",
                reason=f"GPU code for {sm} needs libdevice (LLVM's NVPTX backend links its math functions), and no "
                       "CUDA 12 toolkit wheel is installed here",
                fact="CUDA 12.x is the last toolkit line that targets sm_53; the nvidia-cuda-nvcc-cu12 wheel brings "
                     "its libdevice and ptxas",
                fix="make setup (pip install nvidia-cuda-nvcc-cu12 nvidia-nvfatbin-cu12)",
            )
        if toolchain.cuda.ptxas is None or toolchain.cuda.nvfatbin is None:
            return CheckResult(
                check=name, verdict="warn",
                reason=f"PTX only: the board's driver JIT-compiles it for {sm} on first load (no ptxas or nvFatbin "
                       "here to add the cubin)",
                fix="make setup (pip install nvidia-cuda-nvcc-cu12 nvidia-nvfatbin-cu12)",
            )
        notes.append(f"GPU code: PTX (LLVM NVPTX) + {sm} cubin (ptxas, {toolchain.cuda.describe()})")
    return CheckResult(check=name, verdict="pass", reason="; ".join(notes) or "native build on this machine")


def run_checks(
    model: onnx.ModelProto, info: ModelInfo, profile: DeviceProfile, quant: QuantConfig, *,
    runtime: Runtime = "tvm", importable: frozenset[str] | None = None, toolchain: Toolchain | None = None,
) -> CheckReport:
    """Every check, in order; ``quant`` may come back adjusted (e.g. reduce_range on AVX2)."""
    if importable is None:
        from pipeline.compiler.frontend import tvm_importable_ops

        importable = tvm_importable_ops()
    prequantized, quant = check_prequantized(info, quant)
    ort_result, quant = check_ort_int8_x86(profile, quant, runtime)
    trt_result, quant = check_trt_int8(quant, runtime)
    results = [
        prequantized,
        check_precision(profile, quant, runtime),
        ort_result,
        check_qdq_weights_x86(model, info, profile, quant, runtime),
        trt_result,
        check_format(model, runtime),
        check_op_coverage(model, runtime, importable),
        check_memory(info, profile, quant, runtime),
        check_runtime(profile, runtime),
        check_opset(model, profile, runtime),
        check_ir_version(model, profile, runtime),
    ]
    if runtime == "tvm":
        results.append(check_toolchain(profile, toolchain or detect_toolchain()))
    return CheckReport(profile=profile.name, scheme=quant.label(), runtime=runtime, results=results, quant=quant)
