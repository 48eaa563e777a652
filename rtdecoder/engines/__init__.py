"""Inference backends for the decoder: torch eager/compiled, ONNX Runtime and TensorRT."""
