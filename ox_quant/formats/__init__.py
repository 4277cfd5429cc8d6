"""Quantized weight formats: which configs each can hold, writing them into the graph."""
