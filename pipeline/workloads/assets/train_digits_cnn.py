"""Train the digits reference CNN and export it to ONNX (run once; the .onnx is committed).

Needs torch (``pip install torch==2.13.0`` takes the local CPU wheel); nothing else in the
project imports torch, so the test path stays free of it. Deterministic: fixed seed, fixed
split (the same split that :mod:`pipeline.workloads.digits` evaluates on).

    python pipeline/workloads/assets/train_digits_cnn.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from pipeline.workloads.digits import SEED, load_split  # noqa: E402

OUT = Path(__file__).with_name("digits_cnn.onnx")


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    x_train, y_train, x_test, y_test = load_split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _epoch in range(60):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"test accuracy {acc:.4f} on {len(y_test)} images")
    torch.onnx.export(
        model, torch.zeros(1, 1, 8, 8), str(OUT), opset_version=17, dynamo=False,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
