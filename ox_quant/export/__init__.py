"""The PyTorch side: factory specs, running torch modules, exporting to ONNX."""
