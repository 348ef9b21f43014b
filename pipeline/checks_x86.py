"""The int8 checks of x86 CPUs without AVX-512 VNNI (AVX2, AVX-512BW): their 8-bit dot product, VPMADDUBSW, adds
each two uint8 x int8 products in 16 bits, saturating. onnxruntime's int8 kernels use it there (U8S8, and S8S8
shifted to it), and so do TVM's (compiler.passes.dot's AVX2 and AVX-512BW layouts): exact with 7-bit weights,
29 quantization steps off with 8-bit ones on an emulated Haswell (docs/int8-saturation.md)."""

from __future__ import annotations

from onnx import ModelProto

from pipeline.graph_stats import widest_int8_weight
from pipeline.ingest import ModelInfo
from pipeline.quantize import QuantConfig
from pipeline.verdicts import CheckResult, Runtime
from targets.profiles import DeviceProfile

# |weight| up to 64: 255 x 64 x 2 = 32640 fits VPMADDUBSW's int16 pair sums; 255 x 127 x 2 does not.
EXACT_WEIGHT = 64

_PAIR_SUMS = ("VPMADDUBSW adds each two uint8 x int8 products in 16 bits, saturating: 255 x 127 x 2 does not fit, "
              "255 x 64 x 2 does")


def x86_without_vnni(profile: DeviceProfile) -> bool:
    return profile.cpu.arch == "x86_64" and not profile.cpu.int8_dot_product


def has_vpmaddubsw(profile: DeviceProfile) -> bool:
    """x86 without AVX-512 VNNI, where TVM lays int8 kernels out for VPMADDUBSW (AVX2 or AVX-512BW:
    compiler.passes.dot; a CPU with only the 256-bit AVX-VNNI too: TVM has no layout for that one)."""
    features = set(profile.cpu.features)
    return profile.cpu.arch == "x86_64" and "avx512_vnni" not in features and bool({"avx2", "avx512bw"} & features)


def ort_int8_may_saturate(profile: DeviceProfile, quant: QuantConfig, runtime: Runtime) -> str | None:
    """Why this int8 scheme's results may be off on this device, or None. onnxruntime on an x86 CPU without VNNI
    multiplies activations (int8 ones shifted to uint8 first) by 8-bit int8 weights with VPMADDUBSW, whose 16-bit
    pair sums saturate: U8S8, S8S8 and QOperator all 29 quantization steps off on an emulated Haswell, exact with
    7-bit weights (tests/pipeline/test_ort_int8_saturation.py keeps U8S8, S8S8 and reduce-range). TVM's integer
    kernels add in 32 bits."""
    if runtime != "onnxruntime" or quant.scheme != "int8" or quant.reduce_range or not x86_without_vnni(profile):
        return None
    return ("may saturate: onnxruntime's 8-bit kernels on a CPU without VNNI add each pair of products in 16 bits "
            "(VPMADDUBSW); its measured accuracy decides")


def check_ort_int8_x86(profile: DeviceProfile, quant: QuantConfig,
                       runtime: Runtime) -> tuple[CheckResult, QuantConfig]:
    name = "int8 format on x86 without VNNI"
    if quant.scheme not in ("int8", "dynamic") or quant.prequantized or profile.unit_of(runtime) == "gpu":
        return CheckResult(check=name, verdict="pass", reason="not applicable"), quant
    if runtime == "tvm" and quant.scheme == "int8" and quant.activation_type == "uint8" and has_vpmaddubsw(profile):
        return CheckResult(
            check=name, verdict="pass",
            reason="TVM's int8 kernels here multiply with VPMADDUBSW, exact only with 7-bit weights: using "
                   "reduce_range (a layer whose weights could still saturate keeps a plain kernel, adding in 32 bits)",
            fact=f"{_PAIR_SUMS}; without it TVM's integer kernels are widened int32 loops, slower than fp32",
        ), quant.model_copy(update={"reduce_range": True})
    if not x86_without_vnni(profile):
        return CheckResult(check=name, verdict="pass", reason="not applicable"), quant
    if runtime != "onnxruntime":
        return CheckResult(check=name, verdict="pass", reason=f"{runtime}'s integer kernels add in 32 bits: no "
                           "saturation, 8-bit weights kept"), quant
    adjusted = quant.model_copy(update={"activation_type": "uint8", "reduce_range": True})  # dynamic: U8S8 already
    return CheckResult(
        check=name, verdict="warn",
        reason="without VNNI, onnxruntime's int8 kernels (U8S8, and S8S8 shifted to it) can saturate in VPMADDUBSW, "
               "and S8S8 is no faster than fp32: using U8S8 with reduce_range (7-bit weights)",
        fact="onnxruntime on AVX2: 8-bit weights go through VPMADDUBSW (16-bit saturating pair sums; 29 "
             "quantization steps off on an emulated Haswell, exact with 7-bit weights); S8S8 QDQ measured at fp32 "
             "speed, S8S8 QOperator 3-5x slower; its docs advise reduce_range there",
    ), adjusted


def check_qdq_weights_x86(model: ModelProto, info: ModelInfo, profile: DeviceProfile, quant: QuantConfig,
                          runtime: Runtime) -> CheckResult:
    """A model that came QDQ int8 brings its own weights, which no check can make 7-bit: where they are 8-bit,
    onnxruntime's kernels may saturate on x86 without VNNI, whether onnxruntime is the runtime measured or the
    baseline TVM's agreement is measured against (the same QDQ model, unless --reference gives the fp32 one)."""
    name = "prequantized weights on x86 without VNNI"
    if not quant.prequantized or not x86_without_vnni(profile) or profile.unit_of(runtime) == "gpu":
        return CheckResult(check=name, verdict="pass", reason="not applicable")
    widest = widest_int8_weight(model)
    if widest <= EXACT_WEIGHT:
        return CheckResult(check=name, verdict="pass", reason=f"7-bit weights (|w| <= {widest}): exact in "
                           "onnxruntime's VPMADDUBSW kernels")
    weights = f"the model's int8 weights reach {widest} (8-bit)"
    fix = "export the model with 7-bit weights (onnxruntime's reduce_range, |w| <= 64)"
    if runtime == "onnxruntime":
        reason = (f"{weights}: onnxruntime's kernels on this CPU (no VNNI) may saturate; its measured accuracy "
                  "decides" + ("" if info.reference_path else ", and --reference the fp32 model shows what it costs"))
    elif info.reference_path:
        return CheckResult(check=name, verdict="pass", reason=f"{weights}; the baseline is the fp32 --reference and "
                           f"{runtime}'s integer kernels keep them exact")
    else:
        reason = (f"{weights}: the baseline, onnxruntime on this QDQ model, may saturate on this CPU (no VNNI), and "
                  f"the agreement is measured against it ({runtime}'s integer kernels keep them exact)")
        fix = f"give --reference the fp32 model it was made from, or {fix}"
    return CheckResult(check=name, verdict="warn", reason=reason, fact=_PAIR_SUMS, fix=fix)
