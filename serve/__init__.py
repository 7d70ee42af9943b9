"""The model server: ONNX Runtime (onnxruntime-genai for causal LMs) behind HTTP, for a modelforge
bundle or a registry alias.

    modelforge serve --bundle deploy/champion [--host 127.0.0.1 --port 8000]
    modelforge serve --model-uri models:/digits-classifier@champion

Modules, lowest first: `lm` (a causal LM's generation runtime: batched decoding behind a bounded
queue), `sources` (where a verified model comes from: a bundle folder or a registry alias), `body` (request
bodies within limits), `runtime` (the served model, its readiness, the
thread budget and the batch-size/latency curve), `batcher` (adaptive batching behind a bounded queue
with deadlines), `metrics` (Prometheus), one module per protocol (`predict`: the project's own
/predict and /embed; `v2`: the Open Inference Protocol; `openai`: OpenAI-compatible /v1 for causal
LMs), `triton` (export to a Triton model
repository) and `app` (settings, wiring, probes, auth, drain).
"""
