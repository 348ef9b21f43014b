"""edgedeploy: get a trained ONNX model onto edge hardware and prove how fast and how accurate it is there."""

__version__ = "0.1.0"
