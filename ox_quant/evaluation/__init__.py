"""Task evaluation of real models: runners over torch modules or ONNX files, text data."""
