"""GPU code a board's driver can load: PTX from LLVM's NVPTX backend at an ISA the board's CUDA JIT-compiles, and,
where the toolkit allows, the cubin for its exact SM, both in one fat binary inside the library.

Why not TVM's ``cuda`` target: it writes CUDA C and needs a CUDA toolkit that still targets the board; CUDA 13 (this
machine's) dropped Maxwell (sm_53, the Nano), so the library held CUDA C source nothing compiled. The ``nvptx``
target needs no toolkit: LLVM (in the apache-tvm wheel) writes the PTX, with libdevice for the math functions. The
``nvidia-cuda-nvcc-cu12`` wheel (CUDA 12.9, the last line that knows sm_53) brings libdevice and ``ptxas``;
``nvidia-nvfatbin-cu12`` brings nvFatbin, NVIDIA's library for building fat binaries (`make setup` installs both).

Two TVM 0.27 + LLVM 22 gaps are closed here, both checked by the tests:
- TVM marks kernels with ``!nvvm.annotations`` "kernel", which LLVM 21+ ignores when it emits PTX from TVM's
  in-memory module: every kernel came out as a ``.func`` the driver can't launch. The same IR, parsed back from its
  text, is upgraded by LLVM's reader to the ``ptx_kernel`` calling convention and emits ``.entry`` points.
- libdevice math is float32/float64 only, and TVM's barrier call lacks the argument LLVM 21 wants
  (passes.nvptx_lowering).

A fat binary's PTX is JIT-compiled by any newer driver (an H100 is expected to run Nano code that way: the GPU
check, bench/gpu_check, is prepared for it, not yet run); a driver picks the cubin when its GPU is that SM.
Uncompressed: compressed fatbins of CUDA 12.8+ use a format JetPack 4.6's driver (CUDA 10.2) predates.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

from edgedeploy.errors import CompileError
from pipeline.compiler.passes.nvptx_lowering import register_nvptx_lowering
from targets.host import cuda_tools
from targets.profiles import DeviceProfile, GpuUnit

# Newest PTX ISA each CUDA release's driver JIT-compiles (NVIDIA's PTX ISA release notes).
PTX_ISA_FOR_CUDA = {"10.0": (6, 3), "10.1": (6, 4), "10.2": (6, 5), "11.0": (7, 0), "11.1": (7, 1), "11.2": (7, 2),
                    "11.3": (7, 3), "11.4": (7, 4), "11.5": (7, 5), "11.6": (7, 6), "11.7": (7, 7), "11.8": (7, 8),
                    "12.0": (8, 0), "12.1": (8, 1), "12.2": (8, 2), "12.3": (8, 3), "12.4": (8, 4), "12.5": (8, 5),
                    "12.6": (8, 5), "12.8": (8, 7), "12.9": (8, 8), "13.0": (9, 0)}
FATBIN_MAGIC = 0xBA55ED50


def ptx_isa_for(cuda_version: str) -> tuple[int, int]:
    """The newest PTX ISA a driver of ``cuda_version`` JIT-compiles: the table's, or the nearest older release's."""
    wanted = tuple(int(x) for x in cuda_version.split("."))
    known = [v for v in PTX_ISA_FOR_CUDA if tuple(int(x) for x in v.split(".")) <= wanted]
    if not known:
        raise CompileError(f"No PTX ISA is known for CUDA {cuda_version}", value=cuda_version,
                           expected=f"CUDA {min(PTX_ISA_FOR_CUDA, key=lambda v: tuple(map(int, v.split('.'))))} or "
                                    "newer", fix="check gpu.cuda_version in the profile")
    return PTX_ISA_FOR_CUDA[max(known, key=lambda v: tuple(int(x) for x in v.split(".")))]
FATBIN_KINDS = {1: "ptx", 2: "cubin"}


@functools.cache
def prepare_nvptx(libdevice: Path) -> None:
    """Once per process: TVM links this libdevice into every kernel, and the float16 / barrier rules apply."""
    tvm_ffi.register_global_func("tvm_callback_libdevice_path", lambda _arch: str(libdevice), override=True)
    register_nvptx_lowering()


def nvptx_refusal(profile: DeviceProfile) -> CompileError | None:
    """Why this machine can't build GPU code for ``profile``, or None."""
    if profile.tvm_gpu_target() and cuda_tools() is None:
        return CompileError(
            f"Building GPU code for {profile.name} needs libdevice, and no CUDA 12 toolkit wheel is installed",
            value="nvidia-cuda-nvcc-cu12: not installed",
            fix="make setup (or pip install nvidia-cuda-nvcc-cu12 nvidia-nvfatbin-cu12)",
        )
    return None


@dataclass(frozen=True)
class GpuCode:
    """What goes into the library's CUDA module, and what the manifest says about it."""

    fmt: str  # "fatbin" (PTX + cubin) or "ptx"
    data: bytes
    device_code: str  # "ptx+cubin" or "ptx"
    summary: dict[str, Any]


def cuda_module(executable) -> Any:
    todo = list(executable.mod.imports)
    while todo:
        module = todo.pop()
        if module.kind == "cuda":
            return module
        todo.extend(module.imports)
    raise CompileError("The GPU build has no CUDA module", value="no import of kind 'cuda'",
                       fix="report this: every kernel of a GPU build should be in one")


def _ptx_with_entries(ll: str, sm: str) -> str:
    """TVM's LLVM IR for the kernels, read back by LLVM (which turns the "kernel" annotations into ``ptx_kernel``)
    and emitted as PTX for ``sm``."""
    target = json.dumps({"kind": "llvm", "mtriple": "nvptx64-nvidia-cuda", "mcpu": sm}).replace('"', "\\22")
    flag = f'\n!llvm.module.flags = !{{!9000}}\n!9000 = !{{i32 2, !"tvm_target", !"{target}"}}\n'
    if "!llvm.module.flags" in ll:
        raise CompileError("TVM's kernel IR already has module flags", value="!llvm.module.flags",
                           fix="report this: the PTX step of pipeline/compiler/gpu.py needs updating for this TVM")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.ll"
        path.write_text(ll + flag)
        return tvm.runtime.load_module(str(path)).inspect_source("asm")


def _check_ptx(ptx: str, kernels: list[str], gpu: GpuUnit, board: str) -> tuple[int, int]:
    """Every kernel an ``.entry``, for the GPU's SM, at a PTX ISA the board's CUDA JITs; returns the ISA."""
    version = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    target = re.search(r"^\.target (\S+)", ptx, re.M)
    entries = set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M))
    functions = set(re.findall(r"^\.visible \.func (\w+)\(", ptx, re.M))
    missing = [k for k in kernels if k not in entries or k in functions] or (["(no kernel found)"] if not kernels
                                                                             else [])
    if not version or not target or target.group(1) != gpu.sm or missing:
        raise CompileError(
            "The PTX is not what the board's driver can launch",
            value=f".version {version.groups() if version else None}, .target {target and target.group(1)}, "
                  f"{len(missing)} of {len(kernels)} kernels not .entry ({', '.join(missing[:3])})",
            expected=f".target {gpu.sm}, every kernel an .entry",
            fix="report this with the model: the NVPTX step of pipeline/compiler/gpu.py needs updating",
        )
    isa = (int(version.group(1)), int(version.group(2)))
    newest = ptx_isa_for(gpu.cuda_version)
    if isa > newest:
        raise CompileError(
            f"The PTX needs ISA {isa[0]}.{isa[1]}; {board}'s CUDA {gpu.cuda_version} JITs up to "
            f"{newest[0]}.{newest[1]}", value=f".version {isa[0]}.{isa[1]}",
            fix="check gpu.cuda_version in the profile (the driver's CUDA version on the board)")
    return isa


def _assemble(ptxas: Path, ptx: str, sm: str) -> tuple[bytes, str]:
    """ptxas for the exact SM: the cubin, and its report (registers, spills per kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.cubin"
        source.write_text(ptx)
        done = subprocess.run([str(ptxas), f"-arch={sm}", "-v", str(source), "-o", str(cubin)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise CompileError(f"ptxas could not assemble the kernels for {sm}", value=done.stderr.strip()[-400:],
                               fix="report this with the model")
        return cubin.read_bytes(), done.stderr


def _fatbin(library: Path, ptx: str, cubin: bytes, arch: str) -> bytes:
    """PTX and cubin for ``arch`` (e.g. "53") in one uncompressed fat binary (nvFatbin)."""
    lib = ctypes.CDLL(str(library))
    void_p, char_p, size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    # Declared (nvFatbin.h): sizes are size_t, which a plain Python int passed as a C int would not fill.
    for name, argtypes in (("nvFatbinCreate", [ctypes.POINTER(void_p), ctypes.POINTER(char_p), size_t]),
                           ("nvFatbinAddPTX", [void_p, char_p, size_t, char_p, char_p, char_p]),
                           ("nvFatbinAddCubin", [void_p, void_p, size_t, char_p, char_p]),
                           ("nvFatbinSize", [void_p, ctypes.POINTER(size_t)]), ("nvFatbinGet", [void_p, void_p]),
                           ("nvFatbinDestroy", [ctypes.POINTER(void_p)])):
        getattr(lib, name).argtypes = argtypes
    lib.nvFatbinGetErrorString.argtypes, lib.nvFatbinGetErrorString.restype = [ctypes.c_int], char_p
    handle = void_p()
    options = [b"-64", b"-cuda", b"-host=linux", b"-compress=false"]

    def call(name: str, *args) -> None:
        if (code := getattr(lib, name)(*args)) != 0:
            raise CompileError(f"nvFatbin could not build the fat binary ({name})",
                               value=(lib.nvFatbinGetErrorString(code) or b"").decode(), fix="report this")

    call("nvFatbinCreate", ctypes.byref(handle), (char_p * len(options))(*options), len(options))
    try:
        text = ptx.encode() + b"\0"
        call("nvFatbinAddPTX", handle, text, len(text), arch.encode(), b"kernels", b"")
        call("nvFatbinAddCubin", handle, cubin, len(cubin), arch.encode(), b"kernels")
        size = ctypes.c_size_t()
        call("nvFatbinSize", handle, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        call("nvFatbinGet", handle, buffer)
        return buffer.raw
    finally:
        lib.nvFatbinDestroy(ctypes.byref(handle))


def fatbin_entries(data: bytes) -> list[dict[str, Any]]:
    """The entries of a fat binary: kind (ptx / cubin), arch (53), payload bytes. The container layout is NVIDIA's
    (undocumented, stable since CUDA 4): a 16-byte header (magic, version, header size, body size), then per entry a
    header (kind u16 at 0, its size u32 at 4, payload size u64 at 8, arch u32 at 28) and the payload."""
    magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError(f"not a fat binary (magic {magic:#x})")
    entries, offset, end = [], header_size, header_size + body_size
    while offset < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        entries.append({"kind": FATBIN_KINDS.get(kind, str(kind)), "arch": arch, "bytes": payload})
        offset += entry_header + payload
    return entries


def gpu_code(executable, profile: DeviceProfile) -> GpuCode:
    """The library's kernels as the board will load them: PTX with every kernel an ``.entry``, plus the cubin for the
    board's SM where ptxas and nvFatbin are installed."""
    gpu = profile.gpu
    if gpu is None:
        raise CompileError(f"Profile {profile.name!r} has no GPU to build code for", value="gpu: null",
                           fix="add the board's gpu section to the profile, or build for its CPU")
    tools = cuda_tools()
    ll = cuda_module(executable).inspect_source("ll")
    kernels = re.findall(r"!\{ptr @(\w+), !\"kernel\", i32 1\}", ll)
    ptx = _ptx_with_entries(ll, gpu.sm)
    isa = _check_ptx(ptx, kernels, gpu, profile.name)
    summary: dict[str, Any] = {"sm": gpu.sm, "ptx_isa": f"{isa[0]}.{isa[1]}", "kernels": len(kernels)}
    if tools is None or tools.ptxas is None or tools.nvfatbin is None or not gpu.cubin:
        return GpuCode(fmt="ptx", data=ptx.encode(), device_code="ptx", summary=summary)
    cubin, report = _assemble(tools.ptxas, ptx, gpu.sm)
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
    data = _fatbin(tools.nvfatbin, ptx, cubin, gpu.sm.removeprefix("sm_"))
    summary.update(max_registers=max(registers, default=0), spill_store_bytes=spills, cubin_bytes=len(cubin),
                   fatbin=[{k: e[k] for k in ("kind", "arch")} for e in fatbin_entries(data)])
    return GpuCode(fmt="fatbin", data=data, device_code="ptx+cubin", summary=summary)


def _string(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def packer(code: GpuCode, original_ptx: str, host: dict[str, Any]):
    """An ``fpack_imports`` for ``export_library``: TVM's own serialized imports (runtime.ModulePackImportsToTensor:
    an 8-byte length, the import tree, then per module its kind and bytes; a CUDA module's bytes are its format,
    function table and code), with the CUDA module's format and code replaced by ``code``'s, as an object file for
    the ``host`` target (TVM's codegen.codegen_blob, what export_library itself uses)."""
    old = original_ptx.encode()

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        if is_system_lib or prefix:
            raise CompileError("GPU libraries are built as shared libraries only", value="system-lib")
        blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())
        cuda_key = _string(b"cuda")
        start = blob.find(cuda_key)
        if start < 0:
            raise CompileError("The library's imports hold no CUDA module", value="kind 'cuda' not found")
        size_at = start + len(cuda_key)
        (size,) = struct.unpack_from("<Q", blob, size_at)
        body = blob[size_at + 8: size_at + 8 + size]
        (fmt_len,) = struct.unpack_from("<Q", body, 0)
        tail = _string(old)
        if not body.endswith(tail) or body[8:8 + fmt_len] != b"ptx":
            raise CompileError("The CUDA module's serialized form is not TVM 0.27's", value="unexpected layout",
                               fix="report this: pipeline/compiler/gpu.py's packer needs updating for this TVM")
        function_table = body[8 + fmt_len: len(body) - len(tail)]
        new_body = _string(code.fmt.encode()) + function_table + _string(code.data)
        rest = blob[8: size_at] + _string(new_body) + blob[size_at + 8 + size:]
        packed = struct.pack("<Q", len(rest)) + rest
        codegen_blob = tvm_ffi.get_global_func("codegen.codegen_blob")
        path = str(Path(workspace_dir) / "devc.o")
        codegen_blob(packed, False, json.dumps(host), "").write_to_file(path)
        return path

    return pack
