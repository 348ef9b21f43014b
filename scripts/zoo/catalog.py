"""The model zoo: real architectures the tests never see, each built from its reference definition with random
weights (no download), and what `scripts/zoo/run.py` measures of each (docs/model-coverage.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # torchvision:<builder> | torchvision.segmentation:<builder> | ultralytics:<yaml> | yolov5:<size>
    size: int  # input height = width
    family: str
    normalise: str = "imagenet"  # or "unit": [0, 1] pixels, as YOLO takes them
    dynamic: bool = False  # onnxruntime dynamic int8 measured too (weights in MatMul/Gemm: transformers)
    classifier: bool = True  # one row of class scores per image: top-1 agreement means something


ZOO = (
    ZooModel("resnet50", "torchvision:resnet50", 224, "CNN, bottleneck residual"),
    ZooModel("mobilenet_v3_large", "torchvision:mobilenet_v3_large", 224, "CNN, depthwise + SE + hardswish"),
    ZooModel("efficientnet_b0", "torchvision:efficientnet_b0", 224, "CNN, MBConv + SE + SiLU"),
    ZooModel("regnet_y_400mf", "torchvision:regnet_y_400mf", 224, "CNN, grouped conv + SE"),
    ZooModel("shufflenet_v2_x1_0", "torchvision:shufflenet_v2_x1_0", 224, "CNN, channel shuffle"),
    ZooModel("squeezenet1_1", "torchvision:squeezenet1_1", 224, "CNN, fire modules"),
    ZooModel("convnext_tiny", "torchvision:convnext_tiny", 224, "CNN, 7x7 depthwise + LayerNorm + GELU", dynamic=True),
    ZooModel("vit_b_16", "torchvision:vit_b_16", 224, "transformer (ViT-B/16)", dynamic=True),
    ZooModel("deeplabv3_mobilenet_v3_large", "torchvision.segmentation:deeplabv3_mobilenet_v3_large", 256,
             "segmentation (ASPP, bilinear upsampling)", classifier=False),
    ZooModel("yolov5s", "yolov5:s", 640, "detector (YOLOv5 v7.0 export graph)", normalise="unit", classifier=False),
    ZooModel("yolov8n", "ultralytics:yolov8n.yaml", 640, "detector (anchor-free, DFL head)", normalise="unit",
             classifier=False),
)
