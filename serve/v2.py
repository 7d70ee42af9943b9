"""The Open Inference Protocol v2 (KServe, Triton): health, model metadata and typed-tensor
inference, in JSON or with the binary tensor extension Triton's clients use by default.

Classifier bundles take their graph's own inputs (FP32, or INT64 token ids); sentence encoders take
one BYTES tensor `text`. Errors are `{"error": "..."}` with a 4xx/5xx status, as the protocol says.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from serve.body import BadRequest
from serve.context import ServeContext, check_finite
from serve.predict import numbers_problem
from serve.sources import LoadedModel

# ONNX Runtime's type names -> the protocol's, and the numpy types they travel as.
DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}
NUMPY = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
HEADER = "Inference-Header-Content-Length"


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def tensors(model: LoadedModel) -> tuple[list[dict], list[dict]]:
    """The model's inputs and outputs as the protocol describes them."""
    describe = lambda specs: [
        {"name": s["name"], "datatype": DATATYPES.get(s["dtype"], s["dtype"]), "shape": _dims(s["shape"])}
        for s in specs
    ]
    outputs = describe(model.manifest["outputs"])
    if model.family == "encoder":
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}], outputs
    return describe(model.manifest["inputs"]), outputs


def model_name(ctx: ServeContext, model: LoadedModel) -> str:
    return ctx.settings.model_name or (model.manifest.get("registered_model") or {}).get("name") or "model"


def model_version(model: LoadedModel) -> str:
    return str((model.manifest.get("registered_model") or {}).get("version") or 1)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        head, binary = body, b""
    elif not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(400, f"{HEADER} {header_length!r} does not fit a body of {len(body)} bytes")
    else:
        head, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BadRequest(400, f"inference request is not valid JSON ({err})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest(400, 'inference request must be a JSON object with an "inputs" array')
    return request, binary


def _bytes_elements(raw: bytes, name: object) -> list[bytes]:
    """The protocol's BYTES encoding: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest(400, f"input {name!r}: truncated BYTES element")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise BadRequest(400, f"input {name!r}: BYTES element of {n} bytes runs past the data")
        out.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return out


def _tensor(spec: dict, expected: dict, binary: bytes, offset: int, max_batch: int) -> tuple[np.ndarray | list, int]:
    """One input tensor checked against the model's: datatype, shape, values. Returns it and the
    offset of the next binary blob."""
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if datatype != expected["datatype"]:
        raise BadRequest(400, f"input {name!r} has datatype {datatype}, the model expects {expected['datatype']}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(400, f"input {name!r}: shape must be a non-empty list of sizes, got {shape!r}")
    want = expected["shape"]
    if len(shape) != len(want) or any(w != -1 and w != d for w, d in zip(want[1:], shape[1:], strict=True)):
        raise BadRequest(400, f"input {name!r} has shape {shape}, the model expects {want} (-1: any)")
    if shape[0] == 0:
        raise BadRequest(400, f"input {name!r} is an empty batch")
    if shape[0] > max_batch:
        raise BadRequest(413, f"batch of {shape[0]} exceeds the limit of {max_batch}")
    count = int(np.prod(shape))
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(400, f"input {name!r}: binary_data_size {size!r} runs past the body")
        raw, offset = binary[offset : offset + size], offset + size
        if datatype == "BYTES":
            elements = _bytes_elements(raw, name)
        elif size != count * np.dtype(NUMPY[datatype]).itemsize:
            raise BadRequest(400, f"input {name!r}: {size} bytes do not hold {count} {datatype} values")
        else:
            values: np.ndarray = np.frombuffer(raw, dtype=NUMPY[datatype]).reshape(shape)
    elif "data" in spec:
        data = spec["data"]
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).ravel().tolist() if isinstance(data, list) else [data]
            if not all(isinstance(v, str) for v in flat):
                raise BadRequest(400, f"input {name!r}: BYTES data must be strings in JSON")
            elements = [v.encode() for v in flat]
        else:
            if problem := numbers_problem(data, len(shape), f"input {name!r}"):
                raise BadRequest(400, problem)
            try:
                with np.errstate(over="ignore"):  # beyond the type's range: refused below
                    values = np.asarray(data, dtype=NUMPY[datatype])
            except (ValueError, TypeError, OverflowError):
                raise BadRequest(400, f"input {name!r}: data must be numbers fitting {datatype}") from None
            if values.size != count:
                raise BadRequest(400, f"input {name!r}: {values.size} values do not fill shape {shape}")
            values = values.reshape(shape)
    else:
        raise BadRequest(400, f'input {name!r} has neither "data" nor a binary_data_size parameter')
    if datatype == "BYTES":
        if len(elements) != count:
            raise BadRequest(400, f"input {name!r}: {len(elements)} BYTES elements do not fill shape {shape}")
        return elements, offset
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise BadRequest(400, f"input {name!r} contains NaN or infinity (or a number beyond {datatype}'s range)")
    return values, offset


def parse_infer(model: LoadedModel, body: bytes, header_length: str | None, max_batch: int) -> tuple[dict, dict]:
    """(the request, the graph's feeds) for an inference request, or `BadRequest`."""
    request, binary = _split_body(body, header_length)
    expected = {t["name"]: t for t in tensors(model)[0]}
    given = {spec.get("name"): spec for spec in request["inputs"] if isinstance(spec, dict)}
    if len(given) != len(request["inputs"]) or set(given) != set(expected):
        raise BadRequest(
            400,
            f"inputs must be exactly {sorted(expected)}, got "
            f"{[s.get('name') if isinstance(s, dict) else s for s in request['inputs']]}",
        )
    values, offset = {}, 0
    for spec in request["inputs"]:  # binary blobs follow the inputs' order
        values[spec["name"]], offset = _tensor(spec, expected[spec["name"]], binary, offset, max_batch)
    if len({len(v) for v in values.values()}) > 1:
        raise BadRequest(400, "inputs disagree on the batch size")
    if model.family == "encoder":
        from tasks.encoder.minilm import tokenize

        try:
            texts = [t.decode() for t in values["text"]]
        except UnicodeDecodeError:
            raise BadRequest(400, "input 'text' holds bytes that are not UTF-8") from None
        return request, tokenize(model.tokenizer, texts, model.manifest["max_length"])
    return request, values


def infer_response(model: LoadedModel, name: str, request: dict, outputs: list[np.ndarray]) -> Response:
    """The outputs the request asked for (all by default), in JSON or binary as it asked."""
    described = tensors(model)[1]
    by_name = {d["name"]: (d, out) for d, out in zip(described, outputs, strict=True)}
    asked = request.get("outputs")
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    if asked is None:
        asked = [{"name": d["name"]} for d in described]
    if not isinstance(asked, list) or not all(isinstance(a, dict) and a.get("name") in by_name for a in asked):
        raise BadRequest(400, f"outputs must name some of {sorted(by_name)}")
    result, blobs = [], []
    for spec in asked:
        desc, out = by_name[spec["name"]]
        check_finite(spec["name"], out)
        entry = {"name": desc["name"], "datatype": desc["datatype"], "shape": list(out.shape)}
        if (spec.get("parameters") or {}).get("binary_data", default_binary):
            blob = np.ascontiguousarray(out).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.ravel().tolist()
        result.append(entry)
    head = {"model_name": name, "model_version": model_version(model), "outputs": result}
    if "id" in request:
        head["id"] = request["id"]
    if not blobs:
        return JSONResponse(head)
    header = json.dumps(head).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream", headers={HEADER: str(len(header))})


def router(ctx: ServeContext) -> APIRouter:
    api = APIRouter(prefix="/v2")

    def served(name: str, version: str | None = None) -> LoadedModel:
        model = ctx.model("classifier", "encoder")
        if name != model_name(ctx, model) or (version is not None and version != model_version(model)):
            raise BadRequest(
                404,
                f"unknown model {name!r}"
                + (f" version {version!r}" if version else "")
                + f"; this server serves {model_name(ctx, model)!r} version {model_version(model)}",
            )
        return model

    @api.get("")
    async def server_metadata() -> dict:
        return {"name": "modelforge", "version": "1", "extensions": ["binary_tensor_data"]}

    @api.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @api.get("/health/ready")
    async def ready() -> JSONResponse:
        return ctx.readiness()

    @api.get("/models/{name}")
    @api.get("/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict:
        model = served(name, version)
        inputs, outputs = tensors(model)
        return {
            "name": name,
            "versions": [model_version(model)],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": outputs,
        }

    @api.get("/models/{name}/ready")
    @api.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        served(name, version)
        return ctx.readiness()

    @api.post("/models/{name}/infer")
    @api.post("/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        model = served(name, version)
        body = await ctx.body(request, any_type=True)
        parsed, feeds = await run_in_threadpool(
            parse_infer, model, body, request.headers.get(HEADER), ctx.settings.max_request_samples
        )
        outputs = await ctx.infer(model, feeds)
        return await run_in_threadpool(infer_response, model, name, parsed, outputs)

    return api
