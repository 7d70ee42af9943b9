"""The causal-LM family: model source, ONNX export for generation, weight-only quantization, evaluation,
candidate search and release (registry, bundle, champion/challenger)."""
