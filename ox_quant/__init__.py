"""ox-quant: quantize ONNX model weights for ONNX Runtime and measure what it costs."""

from ox_quant.errors import OxQuantError

__version__ = "0.1.0"

__all__ = ["OxQuantError", "__version__", "verify", "export_model", "export_spec"]

# Public functions, imported on first use so that `import ox_quant` stays light.
_LAZY = {
    "verify": "ox_quant.verification.verify",
    "export_model": "ox_quant.export.exporter",
    "export_spec": "ox_quant.export.exporter",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ox_quant' has no attribute {name!r}")
