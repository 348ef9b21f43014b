"""Write an ONNX model with exactly the graph of an Ultralytics YOLOv5 v7.0 export, filled with random weights.

    .venv/bin/python scripts/make_yolov5s.py yolov5s.onnx                # 7.2 M parameters, ~28 MB
    .venv/bin/python scripts/make_yolov5s.py yolov5n.onnx --size n --imgsz 320   # YOLOv5n, 1.9 M, for tests

Why: the compilers should be tested on a real detector graph, but shipping (or downloading) trained weights is
not an option. What `python export.py --weights yolov5s.pt --include onnx --opset 12` writes is rebuilt here op
by op with numpy and onnx alone, as it looks after the export fuses every BatchNorm into its Conv:

- input `images` float32 [1, 3, imgsz, imgsz]; every Conv block is Conv (with bias) -> Sigmoid -> Mul (SiLU);
- backbone and head of models/yolov5s.yaml: C3 blocks (Bottleneck with a shortcut Add in the backbone, without
  in the head), SPPF (three MaxPool k5), nearest Resize x2 in the opset-12 form (roi and scales inputs), Concat;
- Detect: a 1x1 Conv to 3 * 85 channels per stride 8/16/32, Reshape, Transpose, Sigmoid, and the v7.0 decode
  (Split into xy / wh / conf, xy = (xy * 2 + grid) * stride, wh = (wh * 2) ** 2 * anchor_grid) into the single
  output `output0` [1, 25200, 85] at 640, with the real anchors as constant grids.

Only the weights differ from a trained model: He-normal, each Conv's scaled by one factor that gives its output
unit mean square on a random 640x640 calibration image (LSUV, Mishkin & Matas 2015), and small biases. So the
activations stay O(1) through all 60 Conv layers (plain He-normal lets them fade ~60x by the head, as SiLU passes
less than ReLU; a fixed SiLU gain makes them grow ~700x) and the scores spread over (0, 1). All is drawn from
generators seeded by `--seed`: the weights do not depend on `--imgsz`, and the file's bytes are the same on every
run. Boxes and scores are meaningless, but every shape, op, attribute and constant is the real one.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

SIZES = {"s": (0.33, 0.50), "n": (0.33, 0.25)}  # depth_multiple, width_multiple
NUM_CLASSES = 80
OUTPUTS_PER_ANCHOR = NUM_CLASSES + 5  # x, y, w, h, objectness, class scores
ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))  # pixels, w h
ANCHORS_PER_CELL = 3
STRIDES = (8, 16, 32)
CALIBRATION_SIZE = 640  # the random image the weight scales are measured on (smaller ones transfer worse)
BIAS_STD = 0.01
COCO_NAMES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,parking meter,"
    "bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,"
    "skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,"
    "wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,"
    "chair,couch,potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,oven,"
    "toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush"
).split(",")


@dataclass(frozen=True)
class Activation:
    """A feature map: its tensor in the graph, and its value (C, H, W) on the calibration image."""

    name: str
    value: np.ndarray


def conv_value(x: np.ndarray, weight: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Conv2d without bias on a (C, H, W) array: sliding windows contracted with the weights."""
    kernel = weight.shape[-1]
    windows = sliding_window_view(np.pad(x, ((0, 0), (pad, pad), (pad, pad))), (kernel, kernel), axis=(1, 2))
    return np.tensordot(weight, windows[:, ::stride, ::stride], axes=([1, 2, 3], [0, 3, 4]))


def torch_scope(module: str) -> str:
    """The scope torch.onnx gives a module's nodes: `model.2.m.0.cv1` -> `/model.2/m.0/cv1`."""
    return "/" + re.sub(r"\.(?!\d)", "/", module)


class GraphBuilder:
    """Appends nodes in topological order, named the way torch.onnx names them (`/model.2/cv1/conv/Conv`)."""

    def __init__(self, seed: int, opset: int):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.node_names: set[str] = set()

    def constant(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], scope: str, **attributes) -> str:
        (output,) = self.multi_output_op(op_type, inputs, scope, 1, **attributes)
        return output

    def multi_output_op(self, op_type: str, inputs: list[str], scope: str, count: int, **attributes) -> list[str]:
        name, suffix = f"{scope}/{op_type}", 0
        while name in self.node_names:  # a second Mul in the same module is `Mul_1`, as in the export
            suffix += 1
            name = f"{scope}/{op_type}_{suffix}"
        self.node_names.add(name)
        outputs = [f"{name}_output_{i}" for i in range(count)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attributes))
        return outputs

    def conv2d(self, x: Activation, c_out: int, kernel: int, stride: int, module: str, scope: str) -> Activation:
        """A Conv with its bias: He-normal weights, rescaled so the output has unit mean square on the calibration
        image (LSUV), and small random biases. The scale is rounded to 1/64 octave, so that float rounding in the
        calibration cannot change a byte of the file."""
        shape = (c_out, len(x.value), kernel, kernel)
        weight = self.rng.standard_normal(shape, dtype=np.float32) * math.sqrt(2 / math.prod(shape[1:]))  # He-normal
        bias = self.rng.standard_normal(c_out, dtype=np.float32) * BIAS_STD
        pad = kernel // 2 if kernel != 6 else 2  # autopad, except the stem's explicit p=2
        value = conv_value(x.value, weight.astype(np.float64), stride, pad)
        scale = 2.0 ** (-round(64 * math.log2(np.sqrt(np.mean(value**2)))) / 64)
        weight *= np.float32(scale)
        y = self.op(
            "Conv", [x.name, self.constant(f"{module}.weight", weight), self.constant(f"{module}.bias", bias)],
            scope, dilations=[1, 1], group=1, kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride] * 2,
        )
        return Activation(y, value * scale + bias[:, None, None])

    def conv_block(self, x: Activation, c_out: int, kernel: int, stride: int, module: str) -> Activation:
        """models.common.Conv with its BatchNorm fused: Conv -> SiLU, written as x * Sigmoid(x)."""
        scope = torch_scope(module)
        y = self.conv2d(x, c_out, kernel, stride, f"{module}.conv", f"{scope}/conv")
        return Activation(self.op("Mul", [y.name, self.op("Sigmoid", [y.name], f"{scope}/act")], f"{scope}/act"),
                          y.value / (1 + np.exp(-y.value)))

    def concat(self, inputs: list[Activation], scope: str) -> Activation:
        return Activation(self.op("Concat", [x.name for x in inputs], scope, axis=1),
                          np.concatenate([x.value for x in inputs]))

    def c3(self, x: Activation, c_out: int, repeats: int, shortcut: bool, module: str) -> Activation:
        """models.common.C3: cv3(cat(Bottlenecks(cv1(x)), cv2(x))), each Bottleneck a 1x1 then a 3x3 Conv."""
        hidden = c_out // 2
        y = self.conv_block(x, hidden, 1, 1, f"{module}.cv1")
        for i in range(repeats):
            bottleneck = f"{module}.m.{i}"
            inner = self.conv_block(self.conv_block(y, hidden, 1, 1, f"{bottleneck}.cv1"), hidden, 3, 1,
                                    f"{bottleneck}.cv2")
            y = Activation(self.op("Add", [y.name, inner.name], torch_scope(bottleneck)), y.value + inner.value) \
                if shortcut else inner
        side = self.conv_block(x, hidden, 1, 1, f"{module}.cv2")
        return self.conv_block(self.concat([y, side], f"/{module}"), c_out, 1, 1, f"{module}.cv3")

    def sppf(self, x: Activation, c_out: int, module: str) -> Activation:
        """models.common.SPPF: three chained MaxPool k5 s1 p2, concatenated with their input."""
        pooled = [self.conv_block(x, len(x.value) // 2, 1, 1, f"{module}.cv1")]
        for i in range(3):
            y = self.op("MaxPool", [pooled[-1].name], f"/{module}/m" + (f"_{i}" if i else ""), ceil_mode=0,
                        dilations=[1, 1], kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[1, 1])
            padded = np.pad(pooled[-1].value, ((0, 0), (2, 2), (2, 2)), constant_values=-np.inf)
            pooled.append(Activation(y, sliding_window_view(padded, (5, 5), axis=(1, 2)).max(axis=(3, 4))))
        return self.conv_block(self.concat(pooled, f"/{module}"), c_out, 1, 1, f"{module}.cv2")

    def upsample(self, x: Activation, module: str) -> Activation:
        """nn.Upsample(scale_factor=2, mode='nearest') as torch exports it at opset 11+."""
        roi = self.constant(f"/{module}/roi", np.zeros(0, np.float32))
        scales = self.constant(f"/{module}/scales", np.array([1, 1, 2, 2], np.float32))
        y = self.op("Resize", [x.name, roi, scales], f"/{module}", coordinate_transformation_mode="asymmetric",
                    cubic_coeff_a=-0.75, mode="nearest", nearest_mode="floor")
        return Activation(y, x.value.repeat(2, axis=1).repeat(2, axis=2))

    def detect(self, features: list[Activation], imgsz: int, module: str) -> str:
        """models.yolo.Detect in export mode: per level a 1x1 Conv, then sigmoid and the box decode."""
        scope, per_level = f"/{module}", []
        for level, (x, stride, anchors) in enumerate(zip(features, STRIDES, ANCHORS, strict=True)):
            ny = nx = imgsz // stride
            y = self.conv2d(x, ANCHORS_PER_CELL * OUTPUTS_PER_ANCHOR, 1, 1, f"{module}.m.{level}",
                            f"{scope}/m.{level}").name
            y = self.op("Reshape", [y, self.constant(f"{scope}/shape_{level}", np.array(
                [1, ANCHORS_PER_CELL, OUTPUTS_PER_ANCHOR, ny, nx], np.int64))], scope)
            y = self.op("Transpose", [y], scope, perm=[0, 1, 3, 4, 2])
            y = self.op("Sigmoid", [y], scope)
            sizes = np.array([2, 2, NUM_CLASSES + 1])  # an attribute up to opset 12, an input from 13
            xy, wh, conf = self.multi_output_op("Split", [y], scope, 3, axis=4, split=sizes) if self.opset < 13 else \
                self.multi_output_op("Split", [y, self.constant(f"{scope}/split_{level}", sizes)], scope, 3, axis=4)
            grid, anchor_grid = make_grids(nx, ny, anchors)
            two = self.constant(f"{scope}/two_{level}", np.array(2.0, np.float32))
            xy = self.op("Mul", [xy, two], scope)
            xy = self.op("Add", [xy, self.constant(f"{module}.grid.{level}", grid)], scope)
            xy = self.op("Mul", [xy, self.constant(f"{scope}/stride_{level}", np.array(stride, np.float32))], scope)
            wh = self.op("Mul", [wh, two], scope)
            wh = self.op("Pow", [wh, two], scope)
            wh = self.op("Mul", [wh, self.constant(f"{module}.anchor_grid.{level}", anchor_grid)], scope)
            y = self.op("Concat", [xy, wh, conf], scope, axis=4)
            per_level.append(self.op("Reshape", [y, self.constant(f"{scope}/flat_shape_{level}", np.array(
                [1, ANCHORS_PER_CELL * ny * nx, OUTPUTS_PER_ANCHOR], np.int64))], scope))
        self.nodes.append(helper.make_node("Concat", per_level, ["output0"], name=f"{scope}/Concat_last", axis=1))
        return "output0"


def make_grids(nx: int, ny: int, anchors: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Detect._make_grid: cell offsets minus 0.5 and the anchors in pixels, both [1, 3, ny, nx, 2]."""
    shape = (1, ANCHORS_PER_CELL, ny, nx, 2)
    yv, xv = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
    grid = np.broadcast_to(np.stack((xv, yv), 2) - 0.5, shape)
    anchor_grid = np.broadcast_to(np.array(anchors, np.float32).reshape(1, ANCHORS_PER_CELL, 1, 1, 2), shape)
    return np.ascontiguousarray(grid), np.ascontiguousarray(anchor_grid)


def build_yolov5(size: str = "s", imgsz: int = 640, opset: int = 12, seed: int = 0) -> onnx.ModelProto:
    """The YOLOv5 v7.0 export of `yolov5{size}.pt` at `imgsz`, with seeded random weights."""
    if imgsz % 32:
        raise ValueError(f"imgsz must be a multiple of 32 (the largest stride), not {imgsz}")
    if not 11 <= opset <= 21:  # Resize with roi and scales from 11
        raise ValueError(f"opset must be in 11..21, not {opset}")
    depth_multiple, width_multiple = SIZES[size]

    def width(channels: int) -> int:
        return math.ceil(channels * width_multiple / 8) * 8

    def depth(repeats: int) -> int:
        return max(round(repeats * depth_multiple), 1)

    g = GraphBuilder(seed, opset)
    calibration_image = np.random.default_rng((seed, 1)).random((3, CALIBRATION_SIZE, CALIBRATION_SIZE))
    images = Activation("images", calibration_image)
    # backbone (the comments are the layer indices of models/yolov5s.yaml)
    x = g.conv_block(images, width(64), 6, 2, "model.0")  # P1/2
    x = g.conv_block(x, width(128), 3, 2, "model.1")  # P2/4
    x = g.c3(x, width(128), depth(3), True, "model.2")
    x = g.conv_block(x, width(256), 3, 2, "model.3")  # P3/8
    p3 = g.c3(x, width(256), depth(6), True, "model.4")
    x = g.conv_block(p3, width(512), 3, 2, "model.5")  # P4/16
    p4 = g.c3(x, width(512), depth(9), True, "model.6")
    x = g.conv_block(p4, width(1024), 3, 2, "model.7")  # P5/32
    x = g.c3(x, width(1024), depth(3), True, "model.8")
    x = g.sppf(x, width(1024), "model.9")
    # head
    head_p5 = g.conv_block(x, width(512), 1, 1, "model.10")
    x = g.concat([g.upsample(head_p5, "model.11"), p4], "/model.12")
    x = g.c3(x, width(512), depth(3), False, "model.13")
    head_p4 = g.conv_block(x, width(256), 1, 1, "model.14")
    x = g.concat([g.upsample(head_p4, "model.15"), p3], "/model.16")
    out_p3 = g.c3(x, width(256), depth(3), False, "model.17")  # P3/8-small
    x = g.concat([g.conv_block(out_p3, width(256), 3, 2, "model.18"), head_p4], "/model.19")
    out_p4 = g.c3(x, width(512), depth(3), False, "model.20")  # P4/16-medium
    x = g.concat([g.conv_block(out_p4, width(512), 3, 2, "model.21"), head_p5], "/model.22")
    out_p5 = g.c3(x, width(1024), depth(3), False, "model.23")  # P5/32-large
    output = g.detect([out_p3, out_p4, out_p5], imgsz, "model.24")

    boxes = ANCHORS_PER_CELL * sum((imgsz // stride) ** 2 for stride in STRIDES)
    graph = helper.make_graph(
        g.nodes, "main_graph",
        [helper.make_tensor_value_info(images.name, TensorProto.FLOAT, [1, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, boxes, OUTPUTS_PER_ANCHOR])],
        g.initializers,
    )
    opset_import = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opset_import, producer_name="edgedeploy scripts/make_yolov5s.py",
                              ir_version=helper.find_min_ir_version_for(opset_import))
    helper.set_model_props(model, {"stride": str(max(STRIDES)), "names": str(dict(enumerate(COCO_NAMES)))})
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    """Conv weights and biases, as the YOLOv5 summary counts them after fusion (not the grids and shapes)."""
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.name.endswith((".weight", ".bias")))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="s")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--opset", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = build_yolov5(args.size, args.imgsz, args.opset, args.seed)
    data = model.SerializeToString()
    args.out.write_bytes(data)
    built = time.perf_counter() - started

    import onnxruntime as ort  # self-check: the checker's full pass, then a run on a random image in [0, 1]
    onnx.checker.check_model(str(args.out), full_check=True)
    session = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(args.seed).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    (output,) = session.run(None, {"images": image})
    if not np.isfinite(output).all():
        raise SystemExit(f"{args.out}: output0 has NaN or inf")
    objectness = " ".join(f"{v:.3f}" for v in np.percentile(output[0, :, 4], [0, 1, 50, 99, 100]))
    ops = collections.Counter(node.op_type for node in model.graph.node)

    print(f"wrote {args.out}: YOLOv5{args.size} v7.0 export, imgsz {args.imgsz}, opset {args.opset}, seed {args.seed}")
    print(f"  parameters  {parameter_count(model):,}")
    print(f"  output0     {list(output.shape)}, objectness min/1%/50%/99%/max {objectness}")
    print(f"  file        {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"  ops         {', '.join(f'{op} {n}' for op, n in sorted(ops.items()))}")
    print(f"  built in    {built:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
