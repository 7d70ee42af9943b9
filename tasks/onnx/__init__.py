"""ONNX Runtime sessions and measurements; export from PyTorch with a parity check."""
