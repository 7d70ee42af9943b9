"""The escape hatch: a bundle as a Triton Inference Server model repository.

    modelforge export-triton --bundle deploy/champion --out triton-repo

writes `<name>/config.pbtxt` (the graph's inputs and outputs, `max_batch_size`, dynamic batching,
CPU instances) and `<name>/1/model.onnx`, the bundle's verified model bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from tasks.release.guard import BundleError

TRITON_TYPES = {
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "FLOAT16": "TYPE_FP16",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
}


def _tensors(values, batched: bool) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims without the batch axis when batched; -1 for a dynamic axis)."""
    out = []
    for v in values:
        kind = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
        if kind not in TRITON_TYPES:
            raise BundleError(f"{v.name}: ONNX type {kind} has no Triton equivalent here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        out.append((v.name, TRITON_TYPES[kind], dims[1:] if batched else dims))
    return out


def _block(key: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    items = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
        for n, t, d in tensors
    )
    return f"{key} [\n{items}\n]\n"


def triton_config(model: onnx.ModelProto, name: str, max_batch_size: int, max_wait_us: int = 2000) -> str:
    """config.pbtxt for `model`: batched (dynamic batching) when every input and output has a
    dynamic first axis, else `max_batch_size: 0` with full shapes."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    first = lambda v: v.type.tensor_type.shape.dim[0] if v.type.tensor_type.shape.dim else None
    batched = max_batch_size > 0 and all(
        (d := first(v)) is not None and not d.HasField("dim_value") for v in [*inputs, *graph.output]
    )
    text = (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size if batched else 0}\n'
        + _block("input", _tensors(inputs, batched))
        + _block("output", _tensors(graph.output, batched))
    )
    if batched:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_wait_us}\n}}\n"
    return text + "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"


def export_triton(bundle: Path, repository: Path, name: str | None = None, max_batch_size: int = 64) -> Path:
    """Write the bundle's model into `repository`; its sha256 is checked against the manifest first."""
    bundle, repository = Path(bundle), Path(repository)
    manifest = json.loads((bundle / "manifest.json").read_text())
    model_bytes = (bundle / manifest["model_file"]).read_bytes()
    if hashlib.sha256(model_bytes).hexdigest() != manifest.get("sha256"):
        raise BundleError(f"{bundle}: the model does not match the manifest's sha256; refusing to export it")
    name = name or (manifest.get("registered_model") or {}).get("name") or bundle.name
    target = repository / name
    if target.exists():
        raise ValueError(f"{target} exists: export to a new repository or remove it first")
    model = onnx.load_model_from_string(model_bytes)
    (target / "1").mkdir(parents=True)
    (target / "1" / "model.onnx").write_bytes(model_bytes)
    (target / "config.pbtxt").write_text(triton_config(model, name, max_batch_size))
    if manifest.get("labels"):  # Triton's classification extension reads class names from here
        (target / "labels.txt").write_text("\n".join(map(str, manifest["labels"])) + "\n")
    return target
