"""Calibration: running the float (or partly quantized) model on ONNX Runtime to learn about
the activations that multiply each weight.

* :mod:`~ox_quant.calibration.observe`: the primitive. ``Observer(model, tensors)`` /
  ``observe(model, tensors, feeds, on_feed)`` run a model with chosen intermediate tensors
  exposed as extra outputs, streaming over feeds, weights loaded once (never by Python).
"""
