"""Export: the self-describing ONNX model, its compressed copies, latency, and prediction from it."""
