"""Bits x granularity studies on real models: rows, the peer quantizer, claims, reports."""
