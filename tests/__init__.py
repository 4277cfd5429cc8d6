"""ox-quant's test suite (a package, so that its shared helpers import as ``tests.*``)."""
