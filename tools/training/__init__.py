"""Training the PISF network: on-the-fly synthesis, the training loop, ONNX export."""
