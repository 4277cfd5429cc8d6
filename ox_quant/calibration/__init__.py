"""Calibration: running the float (or partly quantized) model on ONNX Runtime to learn about
the activations that multiply each weight.

* :mod:`~ox_quant.calibration.observe`: the primitive. ``Observer(model, tensors)`` /
  ``observe(model, tensors, feeds, on_feed)`` run a model with chosen intermediate tensors
  exposed as extra outputs, streaming over feeds, weights loaded once (never by Python).
* :mod:`~ox_quant.calibration.feeds`: calibration feeds (``.npz``, a folder of them, text).
* :mod:`~ox_quant.calibration.stats`: streaming per-site statistics, calibration errors.
* :mod:`~ox_quant.calibration.sites`: which activation multiplies each weight; levels.
* :mod:`~ox_quant.calibration.segments`: the graph run level by level, each node once.
* :mod:`~ox_quant.calibration.driver`: ``calibrate`` (one pass, or sequential), used by convert.
"""
