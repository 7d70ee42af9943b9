"""torch -> ONNX with a dynamic batch axis, checked by `onnx.checker` and against PyTorch on ORT."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

from tasks.onnx.runtime import make_session, predict_logits

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# The exporter warns once per missing torchvision op; none of them can occur in these models.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _cache_torchlib_ops() -> None:
    """Every `torch.onnx.export` rebuilds its op registry, and onnxscript parses the Python source of each of
    its ~1,000 ATen functions again to list them: ~0.4 s of each small model's ~0.9 s export, measured, and a run
    exports every candidate. The list depends on nothing but the installed onnxscript, so it is read once per
    process. (torch looks the function up on this module at each export; where a future torch or onnxscript
    has moved it, nothing is cached and exports stay correct, only slower.)"""
    import functools
    import importlib

    try:
        lazy = importlib.import_module("torch.onnx._internal._lazy_import")
        apis = importlib.import_module(lazy.onnxscript_apis._name)
    except (AttributeError, ImportError):
        return
    if callable(ops := getattr(apis, "get_torchlib_ops", None)) and not hasattr(ops, "cache_info"):
        setattr(apis, "get_torchlib_ops", functools.cache(ops))  # noqa: B010 (a module attribute mypy cannot see)


class ExportGraph(NamedTuple):
    """What a model's ONNX graph computes when it is not the model's own forward on one tensor
    (a model offers it as `export_graph(example)`): the module to export, its named example inputs,
    their dynamic axes (name -> {axis: torch.export.Dim}), and metadata for the model file."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, dict]
    metadata: dict[str, str]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    parity_max_abs: float  # max |ORT - PyTorch| over the reference inputs


def save_exported(program, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a `torch.onnx.export` result, with `metadata` in the model's metadata, to `path` only
    once it passes `onnx.checker`.

    The exporter annotates every node with FX provenance (stack traces with local paths): useless to
    serving, a leak of build paths, and a fixed overhead that dominates the size of small models.
    """
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    return write_checked(path, lambda tmp: onnx.save(proto, str(tmp)))


def write_checked(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` an ONNX file beside `path`, then put it at `path` only once it passes
    `onnx.checker`: a failed or interrupted export never leaves a half-written or invalid model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    write(tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    return path


def export_onnx(model: nn.Module, path: Path, reference_x: np.ndarray) -> ExportResult:
    """Export with the dynamo exporter and measure parity on `reference_x` (N, *input_shape).

    A model whose graph takes other inputs than its forward (Hugging Face's `input_ids` and
    `attention_mask`) says so with `export_graph`; `run_onnx.feeds` maps the pipeline's arrays
    onto them. The example batch has 2 samples: with 1 the exporter specialises the batch axis to a
    constant.
    """
    _cache_torchlib_ops()
    model = model.eval()
    example = torch.from_numpy(np.ascontiguousarray(reference_x[:2]))
    export_graph = getattr(model, "export_graph", None)  # a family's own export inputs and axes, if it has them
    graph = (
        export_graph(example)
        if export_graph is not None
        else ExportGraph(model, {INPUT_NAME: example}, {INPUT_NAME: {0: torch.export.Dim("batch")}}, {})
    )
    program = torch.onnx.export(
        graph.module,
        tuple(graph.inputs.values()),
        input_names=list(graph.inputs),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=tuple(graph.dynamic_shapes[k] for k in graph.inputs),
        dynamo=True,
        verbose=False,
    )
    path = save_exported(program, path, graph.metadata)
    with torch.no_grad():
        expected = model(torch.from_numpy(reference_x)).numpy()
    got = predict_logits(make_session(path), reference_x)
    return ExportResult(path, float(np.abs(got - expected).max()))
