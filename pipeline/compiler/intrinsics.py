"""TVM's tensor intrinsics for the target being built, not every target TVM knows.

`import tvm.s_tir.tensor_intrin` (MetaSchedule's TuneContext and builder do it, and so did our VNNI layout) parses
every intrinsic TVM 0.27 ships: CUDA, ROCm, Hexagon, RISC-V, ARM and x86, hundreds of TVMScript functions.
Each parse calls ``inspect.stack()``, which looks every frame's module up by scanning ``sys.modules``, so the cost
grows with what the process has loaded: 45 s of CPU in a bare Python here, 89 s with Prefect, SciPy and onnxruntime
loaded (the `deploy` process), paid by every int8 build and every tuning run, for GPUs the target does not have.

So the package is put in ``sys.modules`` without running its ``__init__`` (which imports all of them), and only
the modules the target needs are imported into it; TVM's own ``import tvm.s_tir.tensor_intrin`` then finds it there.
A target this module does not know gets every module the package's ``__init__`` imports, as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

import tvm

PACKAGE = "tvm.s_tir.tensor_intrin"
BY_TARGET_KIND = {"cuda": "cuda", "rocm": "rocm", "metal": "metal", "hexagon": "hexagon"}
BY_CPU_ARCH = {"x86_64": "x86", "i686": "x86", "aarch64": "arm_cpu", "arm": "arm_cpu", "riscv": "riscv_cpu"}
EVERY_MODULE = ("cuda", "arm_cpu", "x86", "rocm", "hexagon", "riscv_cpu")  # what the package's __init__ imports


def intrinsic_modules(target: tvm.target.Target) -> list[str] | None:
    """The modules of ``tvm.s_tir.tensor_intrin`` that ``target`` (and its host) can use; None if not known."""
    modules = []
    for part in filter(None, (target, target.host)):
        kind = part.kind.name
        if kind == "llvm":
            # No triple: code for this machine.
            arch = str(part.attrs.get("mtriple", "") or platform.machine()).split("-")[0]
            module = next((m for prefix, m in BY_CPU_ARCH.items() if arch.startswith(prefix)), None)
        else:
            module = BY_TARGET_KIND.get(kind)
        if module is None:
            return None
        modules.append(module)
    return list(dict.fromkeys(modules))


def _install_bare_package() -> None:
    """``tvm.s_tir.tensor_intrin`` in ``sys.modules`` without running its ``__init__`` (unless something already
    imported the real package): its submodules then import one by one."""
    if PACKAGE not in sys.modules:
        import tvm.s_tir

        module = importlib.util.module_from_spec(importlib.util.find_spec(PACKAGE))
        sys.modules[PACKAGE] = module
        tvm.s_tir.tensor_intrin = module


def load_modules(*names: str) -> None:
    """Register the intrinsics of these modules of ``tvm.s_tir.tensor_intrin`` (e.g. "x86") and no others."""
    _install_bare_package()
    for name in names:
        importlib.import_module(f"{PACKAGE}.{name}")


def load_tensor_intrinsics(target: tvm.target.Target) -> None:
    """Register the tensor intrinsics MetaSchedule and the builds may name for ``target``."""
    load_modules(*(intrinsic_modules(target) or EVERY_MODULE))
