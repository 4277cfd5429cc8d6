"""Numpy-only building blocks: granularity and config types, quantization, bit packing, metrics."""
