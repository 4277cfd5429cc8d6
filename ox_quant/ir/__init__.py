"""The ONNX graph side (onnx_ir): loading and saving, input validation, constant folding, weight sites. Never imports onnxruntime."""
