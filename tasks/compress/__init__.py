"""Compression: one module per method (its config and its handler), the ORT quantization helpers, the recipe runner."""
