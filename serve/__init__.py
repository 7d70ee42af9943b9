"""The model server: ONNX Runtime behind HTTP, for a modelforge bundle or a registry alias.

    modelforge serve --bundle deploy/champion [--host 127.0.0.1 --port 8000]
    modelforge serve --model-uri models:/digits-classifier@champion

Modules, lowest first: `sources` (where a verified model comes from: a bundle folder or a registry
alias), `body` (request bodies within limits), `runtime` (the served model, its readiness, the
thread budget and the batch-size/latency curve), `batcher` (adaptive batching behind a bounded queue
with deadlines), `metrics` (Prometheus), one module per protocol (`predict`: the project's own
/predict and /embed; `v2`: the Open Inference Protocol), `triton` (export to a Triton model
repository) and `app` (settings, wiring, probes, auth, drain).
"""
