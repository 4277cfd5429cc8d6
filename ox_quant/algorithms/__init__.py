"""Quantization algorithms: how a weight's parameters and codes are chosen (numpy only).

Each algorithm is a :class:`~ox_quant.algorithms.base.Quantizer` registered by name in
:mod:`ox_quant.algorithms.registry`; ``QuantConfig.algorithm`` names it. Round-to-nearest
(``"rtn"``) is the reference composition.
"""
