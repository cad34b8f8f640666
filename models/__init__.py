"""PISF network definition (torch, training/export only) and the shipped ONNX models."""
