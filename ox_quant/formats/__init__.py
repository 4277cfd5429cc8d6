"""On-disk formats of quantized weights, one module each (``base.QuantFormat``), listed in
``registry.FORMATS``; ``choice`` picks one per weight, ``writers`` holds what their writers share."""
