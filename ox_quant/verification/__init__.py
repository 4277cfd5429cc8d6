"""Comparing a candidate model with a reference: inputs, output metrics, per-layer attribution."""
