"""Model zoo: architecture builders exported to ONNX, loaders for real pretrained models."""
