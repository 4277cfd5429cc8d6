"""ox-quant: quantize ONNX model weights for ONNX Runtime and measure what it costs."""

from ox_quant.errors import OxQuantError

__version__ = "0.1.0"

__all__ = ["OxQuantError", "__version__"]
