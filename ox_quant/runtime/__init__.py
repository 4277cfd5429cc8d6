"""ONNX Runtime: sessions, providers, the custom-op library and its build."""
