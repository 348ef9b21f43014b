"""Winograd convolution for the float 3x3 convs of channel-last CPU networks.

A 3x3 stride-1 conv computes each 4x4 block of outputs from a 6x6 block of inputs with 9 x 16 = 144 multiply-adds
per channel pair. Winograd's F(4x4, 3x3) computes the same block with 36: the 6x6 input tile and the 3x3 filter
are each transformed into a 6x6 tile (V = B^T d B, U = G g G^T), multiplied elementwise, summed over the input
channels, and transformed back (Y = A^T M A). Summed over the channels, the elementwise products are 36
independent matmuls, [tiles, C] x [C, O]: the bulk of the work, 4x fewer multiply-adds than the direct conv,
and the shape MetaSchedule tunes best. Each conv becomes three kernels:

    V = call_tir(winograd_input, x [1, H, W, C])   -> [36, tiles, C]   (the zero padding read in place)
    M = matmul(V, U)                                -> [36, tiles, O]   (U: the filter, transformed here, once)
    y = call_tir(winograd_output, M)                -> [1, OH, OW, O]   (bias, activation, residual fused in)

YOLOX's 3x3 stride-1 convs are 62 % of its FLOPs (96 -> 96 channels at 52x52, 26x26, 13x13; 48 -> 48 at 52x52;
192 -> 192 at 13x13): the layers where onnxruntime's fp32 GEMMs were 1.5x faster than TVM's tuned convs.

The transforms are cheap data movement if written right, and MetaSchedule's generic rules don't write them
right: as reductions over constant-matrix buffers they took 2.2 and 1.8 ms on YOLOX's 96-channel 52x52 conv
(64 trials), half again the direct conv. Here each is separable (rows, then columns: 12 multiply-adds per
element, not 36), its terms written out with the matrix entries as constants, and scheduled by a rule of its
own (:func:`schedule_input`, :func:`schedule_output`, registered as MetaSchedule custom rules for CPU targets):
one tile at a time in parallel, its 6x6 positions unrolled so every coefficient is a literal, the channels
vectorized. On that conv: input 0.13-0.15 ms, output with bias and SiLU 0.20-0.21 ms, the 36 matmuls 1.7-1.9 ms
after 48 trials, against 4.4-10.0 ms for the direct conv after 48 (`bench/winograd_layer.py`,
docs/lab-x86/winograd.md).

The matrices are TVM's own (``topi.nn.winograd_util``: Cook-Toom with the points 0, -1, 1, 1/2, -2 and inf).
In float32 the result differs from the direct conv by rounding: ~3e-6 of the largest output on random data
(tests/pipeline/test_tvm_winograd.py allows 2e-5).

Only ungrouped float32 convs whose channels fill whole vectors on both sides, with at least 16 tiles: PP-LCNet's
depthwise convs and 3-channel stem stay direct, so do integer convs (passes.dot) and the digits CNN.
Only in tuned builds (frontend.rewrites): untuned, the transforms would be plain serial loops.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, te

from pipeline.compiler.passes.relax_util import (
    KernelSet,
    count_calls,
    falling_back,
    int64_shape,
    rewrite_convs,
    static_nhwc_batch_one,
)

__all__ = ["count_winograd_convs", "register_schedule_rules", "winograd_convs", "winograd_filter"]


TILE, KERNEL = 4, 3  # F(4x4, 3x3)
ALPHA = TILE + KERNEL - 1  # the transformed tile's side, 6
LANES = 16  # float32 lanes of an AVX-512 register: the vector width of the channel loops
# Channels must fill whole vectors (YOLOX's 24-channel conv at 104x104 spent 2 ms in its transforms, a vector
# half empty, where the direct conv takes ~1), and the outputs this many tiles (13x13): fewer, and the 36 matmuls
# have a handful of rows each.
MIN_TILES = 16
INPUT_PREFIX, OUTPUT_PREFIX = "winograd_input_", "winograd_output_"
# The rule names are in the kernels' blocks, so in the workload a tuning database keys its records by: a change to
# a rule must come with a new version here, or records the old rule scheduled are replayed on the new one.
INPUT_RULE, OUTPUT_RULE = "edgedeploy_winograd_input_v1", "edgedeploy_winograd_output_v1"
# FuseOps' patterns (relax.transform.AnnotateTIROpPattern leaves a kernel's own alone). Written out, the transforms
# read as injective, and FuseOps fused one conv's output transform, its activation and the next conv's input
# transform into one kernel (YOLOX's back-to-back 3x3 convs) that neither schedule rule fits. Declared: the output
# transform takes the elementwise ops after it (bias, activation, residual add), as a conv does; the input
# transform takes nothing.
OUT_ELEMWISE_FUSABLE, OPAQUE = 4, 8


@functools.cache
def transform_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [6, 4], B [6, 6], G [6, 3]) float64, as TVM's winograd convs use them."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(TILE + KERNEL - 2), TILE, KERNEL)


def winograd_filter(hwio: np.ndarray) -> np.ndarray:
    """U[eps * 6 + nu, c, o] = (G g[:, :, c, o] G^T)[eps, nu] for an HWIO 3x3 filter, in float32."""
    _, _, g = transform_matrices()
    u = np.einsum("ek,klco,nl->enco", g, hwio.astype(np.float64), g)
    return np.ascontiguousarray(u.reshape(ALPHA * ALPHA, *hwio.shape[2:]).astype(np.float32))


def output_size(shape: tuple[int, int, int, int], padding: tuple[int, int, int, int]) -> tuple[int, int]:
    """(OH, OW) of a 3x3 stride-1 conv over the [1, H, W, C] ``shape`` padded (top, left, bottom, right)."""
    top, left, bottom, right = padding
    return shape[1] + top + bottom - KERNEL + 1, shape[2] + left + right - KERNEL + 1


def tiles(size: int) -> int:
    """4-wide output tiles along an axis of ``size`` outputs (the last one partly past the edge)."""
    return -(-size // TILE)


def _entry(matrix: np.ndarray, row: int, column) -> tvm.tirx.PrimExpr:
    """``matrix[row, column]`` for a loop variable ``column``: a chain of selects on constants, which folds into
    one literal once the schedule unrolls that loop."""
    values = [float(v) for v in matrix[row]]
    entry = tvm.tirx.const(values[-1], "float32")
    for j in range(len(values) - 2, -1, -1):
        if values[j] != values[-1]:
            entry = tvm.tirx.Select(column == j, tvm.tirx.const(values[j], "float32"), entry)
    return entry


def winograd_input(shape: tuple[int, int, int, int], top: int, left: int, out_hw: tuple[int, int]):
    """V[eps * 6 + nu, p, c] = sum_{a, b} B[a, eps] B[b, nu] x[tile p's (a, b) input, c], x read with its zero
    padding in place (``top``/``left`` rows/columns before, whatever the last tile reaches past the edge after).

    Separable, in two steps of 6 terms each (36 x 12 multiply-adds per tile and channel, not 36 x 36): the rows,
    ``rows[a, nu, p, c] = sum_b B[b, nu] x[(a, b)]``, then the columns. The terms are written out (no reduction
    axis, constant coefficients once unrolled); :func:`schedule_input` computes the rows of a tile just before
    its columns."""
    _, h, w, c = shape
    across = tiles(out_hw[1])
    count = tiles(out_hw[0]) * across
    _, b_matrix, _ = transform_matrices()
    x = te.placeholder(int64_shape(shape), "float32", name="x")

    def row(a, nu, p, ci):
        y = p // across * TILE + a - top
        total = None
        for b in range(ALPHA):
            z = p % across * TILE + (b - left)
            # Branch-free padding: read a pixel that exists, weigh it 0 if it is padding. The weight depends on
            # the tile only, not the channel: computed once outside the vectorized channel loop.
            inside = tvm.tirx.all(y >= 0, y < h, z >= 0, z < w)
            pixel = x[0, tvm.te.max(tvm.te.min(y, h - 1), 0), tvm.te.max(tvm.te.min(z, w - 1), 0), ci]
            term = pixel * tvm.tirx.Select(inside, _entry(b_matrix, b, nu), tvm.tirx.const(0.0, "float32"))
            total = term if total is None else total + term
        return total

    rows = te.compute(int64_shape((ALPHA, ALPHA, count, c)), row, name="winograd_rows",
                      attrs={"schedule_rule": "None"})  # not inlined: scheduled with the columns

    def column(k, p, ci):
        eps, nu = k // ALPHA, k % ALPHA
        total = None
        for a in range(ALPHA):
            term = rows[a, nu, p, ci] * _entry(b_matrix, a, eps)
            total = term if total is None else total + term
        return total

    v = te.compute(int64_shape((ALPHA * ALPHA, count, c)), column, name="winograd_input",
                   attrs={"schedule_rule": INPUT_RULE})
    name = f"{'x'.join(str(d) for d in shape)}_p{top}x{left}_{out_hw[0]}x{out_hw[1]}"
    return te.create_prim_func([x, v]).with_attrs({"global_symbol": f"{INPUT_PREFIX}{name}", "op_pattern": OPAQUE})


def winograd_output(out_hw: tuple[int, int], o: int):
    """y[0, h, w, o] = sum_{a, b} A[a, h % 4] A[b, w % 4] M[a * 6 + b, tile of (h, w), o], separable like
    :func:`winograd_input`'s: ``columns[vh, b, tile, o] = sum_a A[a, vh] M[a * 6 + b, tile, o]`` first.
    Elementwise in its output: the bias and activation after it are computed in it."""
    oh, ow = out_hw
    across = tiles(ow)
    count = tiles(oh) * across
    a_matrix, _, _ = transform_matrices()
    m = te.placeholder(int64_shape((ALPHA * ALPHA, count, o)), "float32", name="M")

    def column(vh, b, tile, co):
        total = None
        for a in range(ALPHA):
            term = m[a * ALPHA + b, tile, co] * _entry(a_matrix, a, vh)
            total = term if total is None else total + term
        return total

    columns = te.compute(int64_shape((TILE, ALPHA, count, o)), column, name="winograd_columns",
                         attrs={"schedule_rule": "None"})  # not inlined: scheduled with the output

    def value(n, i, j, co):
        tile = i // TILE * across + j // TILE
        total = None
        for b in range(ALPHA):
            term = columns[i % TILE, b, tile, co] * _entry(a_matrix, b, j % TILE)
            total = term if total is None else total + term
        return total

    y = te.compute(int64_shape((1, oh, ow, o)), value, name="winograd_output", attrs={"schedule_rule": OUTPUT_RULE})
    return te.create_prim_func([m, y]).with_attrs({"global_symbol": f"{OUTPUT_PREFIX}{oh}x{ow}_{o}",
                                                   "op_pattern": OUT_ELEMWISE_FUSABLE})


def _epilogue(sch):
    """The ops FuseOps fused after the transform (bias, activation): each inlined into the next, so that one
    block is left, which writes the kernel's output (None if the transform writes it)."""
    from tvm.s_tir.schedule import ScheduleError

    kernel = {"winograd_output", "winograd_columns"}
    inlined = True
    while inlined:
        inlined = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint in kernel:
                continue
            try:
                sch.compute_inline(block)
            except ScheduleError:  # the last one: it writes the output
                continue
            inlined = True
            break
    rest = [block for block in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(block).name_hint not in kernel]
    return rest[0] if len(rest) == 1 else None


def _channels_vectorized(sch, channel_loop):
    """Split the channel loop into whole vectors, the vector loop innermost and vectorized."""
    outer, lanes = sch.split(channel_loop, [None, LANES])
    sch.vectorize(lanes)
    return outer


def _first_half_per_tile(sch, half, tile) -> None:
    """The separable transform's first half (rows or columns) computed for each tile just before the second,
    its two small loops unrolled (constant coefficients), its channels vectorized."""
    sch.compute_at(half, tile)
    first, second, channels = sch.get_loops(half)[-3:]
    _channels_vectorized(sch, channels)
    sch.unroll(first)
    sch.unroll(second)


def schedule_input(sch, block):
    """Tiles in parallel; for each tile, its rows then its columns, all 36 outputs of each unrolled (their
    coefficients become constants), the channels vectorized."""
    rows = sch.get_sblock("winograd_rows")
    k, p, c = sch.get_loops(block)
    _channels_vectorized(sch, c)
    sch.reorder(p, k)
    sch.parallel(p)
    sch.unroll(k)
    _first_half_per_tile(sch, rows, p)
    return [sch]


def schedule_output(sch, block):
    """Tiles in parallel; for each tile, its columns, its 4x4 outputs (unrolled: constant coefficients), then the
    bias and activation on them while they are in cache; the channels vectorized throughout."""
    epilogue = _epilogue(sch)
    columns = sch.get_sblock("winograd_columns")
    _, i, j, c = sch.get_loops(block)
    i_tile, i_in = sch.split(i, [None, TILE])
    j_tile, j_in = sch.split(j, [None, TILE])
    _channels_vectorized(sch, c)
    sch.reorder(i_tile, j_tile, i_in, j_in)
    tile = sch.fuse(i_tile, j_tile)
    sch.parallel(tile)
    sch.unroll(i_in)
    sch.unroll(j_in)
    _first_half_per_tile(sch, columns, tile)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, tile)
        _channels_vectorized(sch, sch.get_loops(epilogue)[-1])
    return [sch]


@functools.cache
def register_schedule_rules() -> None:
    """MetaSchedule calls these for the transform blocks (their ``schedule_rule``) on CPU targets."""
    for name, rule in ((INPUT_RULE, schedule_input), (OUTPUT_RULE, schedule_output)):
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.{name}", falling_back(rule, "Winograd"), override=True)


def _filter(call: relax.Call) -> np.ndarray | None:
    """The HWIO float32 weight of a conv Winograd computes (3x3, stride and dilation 1, ungrouped, NHWC in and
    out, static batch-1 input, channels in whole vectors, at least MIN_TILES tiles), else None."""
    attrs = call.attrs
    x, w = call.args
    shape = static_nhwc_batch_one(x)
    if (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NHWC", "HWIO") or \
            str(attrs.out_layout) not in ("", "NHWC") or int(attrs.groups) != 1 or \
            str(attrs.out_dtype) not in ("", "None", "void", "float32") or str(x.ty.dtype) != "float32" or \
            not isinstance(w, tvm.ir.GenericConst) or shape is None or \
            any(int(s) != 1 for s in (*attrs.strides, *attrs.dilation)):
        return None
    hwio = w.value.numpy()
    if hwio.dtype != np.float32 or hwio.shape[:2] != (KERNEL, KERNEL) or any(n % LANES for n in hwio.shape[2:]):
        return None
    oh, ow = output_size(shape, tuple(int(p) for p in attrs.padding))
    if tiles(oh) * tiles(ow) < MIN_TILES:
        return None
    return hwio


class WinogradKernels(KernelSet):
    """The transform kernels. Their schedule rules are registered where they are used: before tuning
    (pipeline.compiler.tuning.search.tune_and_compile), not here."""

    def conv(self, x: relax.Expr, hwio: np.ndarray, padding: tuple[int, int, int, int]) -> relax.Expr:
        """The NHWC conv of ``x`` with the 3x3 filter ``hwio``, padded (top, left, bottom, right), by Winograd."""
        shape = static_nhwc_batch_one(x)
        top, left, _, _ = padding
        out_hw = output_size(shape, padding)
        c, o = hwio.shape[2:]
        count = tiles(out_hw[0]) * tiles(out_hw[1])
        forward = self._kernel(("in", shape, top, left, out_hw),
                               lambda: winograd_input(shape, top, left, out_hw))
        v = relax.call_tir(forward, [x], out_ty=relax.TensorType((ALPHA * ALPHA, count, c), "float32"))
        m = relax.op.matmul(v, relax.const(winograd_filter(hwio)))
        back = self._kernel(("out", out_hw, o), lambda: winograd_output(out_hw, o))
        return relax.call_tir(back, [m], out_ty=relax.TensorType((1, *out_hw, o), "float32"))


def winograd_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """Every float 3x3 stride-1 NHWC conv that pays for it computed by Winograd F(4x4, 3x3)."""
    kernels = WinogradKernels()

    def rewrite(call: relax.Call) -> relax.Expr | None:
        hwio = _filter(call)
        return None if hwio is None else kernels.conv(call.args[0], hwio, tuple(int(p) for p in call.attrs.padding))

    return rewrite_convs(mod, kernels, rewrite)


def count_winograd_convs(mod: tvm.IRModule) -> int:
    """Convs computed by Winograd in the module's Relax functions (one output transform each)."""
    return count_calls(mod, lambda call: call.op.name == "relax.call_tir"
                       and call.args[0].name_hint.startswith(OUTPUT_PREFIX))
