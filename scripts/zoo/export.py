"""Export the zoo's PyTorch models to ONNX, random-initialised: `.lab/zoo/bin/python scripts/zoo/export.py OUT`.

Each architecture comes from its reference definition (torchvision 0.28, Ultralytics 8.4), seeded, weights never
downloaded. A randomly initialised BatchNorm is an identity (mean 0, variance 1), so activations drift in scale
layer by layer, unlike a trained network's; each BatchNorm's statistics are therefore settled on 32 zoo images
(scripts/zoo/images.py) before export, as "BN recalibration" does: every layer then sees normalised activations,
as it would after training. Boxes, classes and masks are meaningless; ops, shapes and value ranges are realistic.
Exported with a dynamic batch dimension (opset 17, TorchScript exporter), as most users' exports are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no update checks, no downloads
import torch  # noqa: E402
import torch.library  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog import ZOO, ZooModel  # noqa: E402
from images import batch  # noqa: E402

# torchvision's compiled ops (nms, roi_align) don't load beside the CPU torch; importing torchvision registers fake
# kernels for these two by name, so their schemas are declared first. No zoo model calls them.
_TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _TORCHVISION_OPS.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _MainOutput(torch.nn.Module):
    """torchvision's segmentation models return a dict: export its "out"."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def build(entry: ZooModel) -> tuple[torch.nn.Module, str, str]:
    """The module, its input name and its output name."""
    kind, name = entry.source.split(":", 1)
    if kind == "torchvision":
        import torchvision.models

        return getattr(torchvision.models, name)(weights=None), "input", "output"
    if kind == "torchvision.segmentation":
        import torchvision.models.segmentation as segmentation

        model = getattr(segmentation, name)(weights=None, weights_backbone=None, aux_loss=False)
        return _MainOutput(model), "input", "output"
    if kind == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(name, verbose=False)
        for module in model.modules():
            if type(module).__name__ == "Detect":  # one output [N, 4 + classes, anchors], as `yolo export` writes
                module.export, module.format = True, "onnx"
        return model, "images", "output0"
    raise SystemExit(f"{entry.name}: no exporter for {kind!r} here")


def no_zero_layers(model: torch.nn.Module) -> int:
    """Layers a reference definition initialises to zero (ViT's classification head: its outputs would all be 0, and
    every runtime would "agree" on them) get small random weights instead, as after training."""
    zeroed = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, 0.02)
                zeroed += 1
    return zeroed


def settle_batchnorm(model: torch.nn.Module, entry: ZooModel) -> int:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    if norms:
        model.train()
        with torch.no_grad():
            for seed in range(4):
                model(torch.from_numpy(batch(8, entry.size, seed=10_000 + seed, normalise=entry.normalise)))
    model.eval()
    return len(norms)


def export(entry: ZooModel, out: Path) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    model, input_name, output_name = build(entry)
    zeroed = no_zero_layers(model)
    norms = settle_batchnorm(model, entry)
    example = torch.from_numpy(batch(1, entry.size, seed=20_000, normalise=entry.normalise))
    with torch.no_grad():
        spread = float(model(torch.from_numpy(batch(2, entry.size, seed=20_001, normalise=entry.normalise))).std())
    if not spread > 0:
        raise SystemExit(f"{entry.name}: its outputs are constant: no runtime could disagree on them")
    path = out / f"{entry.name}.onnx"
    torch.onnx.export(model, (example,), str(path), opset_version=17, dynamo=False, input_names=[input_name],
                      output_names=[output_name], dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
    return {"name": entry.name, "path": str(path), "parameters": sum(p.numel() for p in model.parameters()),
            "batchnorms_settled": norms, "zero_layers_initialised": zeroed, "output_std": spread,
            "seconds": round(time.perf_counter() - started, 1),
            "exporter": f"torch {torch.__version__}"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", help="names from scripts/zoo/catalog.py")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for entry in ZOO:
        if entry.source.startswith("yolov5:") or (args.only and entry.name not in args.only):
            continue  # YOLOv5: scripts/make_yolov5s.py writes it (onnx alone, no torch)
        if (args.out / f"{entry.name}.onnx").exists():
            print(f"{entry.name}: exported already")
            continue
        record = export(entry, args.out)
        (args.out / f"{entry.name}.export.json").write_text(json.dumps(record, indent=1))
        print(f"{entry.name}: {record['parameters']:,} parameters, {record['batchnorms_settled']} BatchNorms "
              f"settled, {record['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
