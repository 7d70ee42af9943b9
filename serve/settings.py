"""Every setting of the server, with its default and a one-line doc (`modelforge serve --help`)."""

from __future__ import annotations

import ipaddress
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.lm import ENGINE_STATIC_BATCH
from serve.runtime import cpu_count
from serve.sources import LoadOptions

TOKEN_ENV = "MODELFORGE_AUTH_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind; beyond loopback an auth token is required.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    auth_token: str | None = Field(
        None,
        min_length=16,
        description=f"Bearer token every endpoint but the health probes requires (default: ${TOKEN_ENV}).",
    )
    docs: bool = Field(False, description="Serve the OpenAPI page /docs and /openapi.json.")
    model_name: str | None = Field(
        None, description="The model's name in the v2 protocol (default: the registered model's name, else 'model')."
    )
    max_body_bytes: int = Field(8 << 20, gt=0, description="Largest request body (413 above, checked before reading).")
    max_request_samples: int = Field(1024, ge=1, description="Most samples one request may carry (413 above).")
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's headers (else the "
        "connection is closed) and its body (else 408).",
    )
    poll_seconds: float = Field(1.0, gt=0, description="How often the source is checked for a new model.")
    workers: int = Field(1, ge=1, description="Inference threads, each running whole ONNX Runtime calls.")
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime threads per call (default: "
        "cores // workers); threads x workers may not exceed the cores.",
    )
    batching: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: measure the batch-size/latency curve "
        "at start and batch only where it raises throughput within the p99 target.",
    )
    max_batch: int = Field(64, ge=1, description="Most samples coalesced into one ONNX Runtime call.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest a request waits for others to join its batch.")
    p99_target_ms: float = Field(
        50.0, gt=0, description="Latency batching must stay within (one call's p99 plus the wait)."
    )
    max_queue: int = Field(256, ge=1, description="Requests waiting for inference before new ones get 429.")
    lm_max_batch: int = Field(
        ENGINE_STATIC_BATCH,
        ge=1,
        le=ENGINE_STATIC_BATCH,
        description="Causal LMs: "
        "sequences decoded together in one step (onnxruntime-genai's static batches hold at "
        f"most {ENGINE_STATIC_BATCH}).",
    )
    lm_max_waiting: int = Field(
        32, ge=0, description="Causal LMs: requests waiting beyond a full batch before new ones get 429."
    )
    request_timeout_ms: float = Field(
        5000.0, gt=0, description="A request still waiting for inference after this gets 503 with Retry-After."
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: the longest requests in flight may take to finish before the server exits 0.",
    )
    drain_grace_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM: seconds the server keeps accepting while "
        "/readyz says draining, so load balancers stop sending first.",
    )

    @model_validator(mode="before")
    @classmethod
    def _token_from_env(cls, data: dict) -> dict:
        if isinstance(data, dict) and not data.get("auth_token") and os.environ.get(TOKEN_ENV):
            return {**data, "auth_token": os.environ[TOKEN_ENV]}
        return data

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        problems = []
        if not is_loopback(self.host) and not self.auth_token:
            problems.append(
                f"host {self.host} is beyond loopback: pass --auth-token (or set ${TOKEN_ENV}) so that "
                "only callers holding it reach the model"
            )
        cores = cpu_count()
        if self.threads_per_worker * self.workers > cores:
            problems.append(
                f"{self.workers} worker(s) x {self.threads_per_worker} intra-op thread(s) exceed the "
                f"{cores} cores: threads would fight over them"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def threads_per_worker(self) -> int:
        return self.intra_op_threads or max(1, cpu_count() // self.workers)

    @property
    def load_options(self) -> LoadOptions:
        return LoadOptions(self.threads_per_worker, self.lm_max_batch, self.lm_max_waiting)


def add_arguments(parser) -> None:
    """One command-line flag per setting, its doc as the help (`--max-body-mb` in megabytes)."""
    from typing import get_args, get_origin

    for name, field in ServeSettings.model_fields.items():
        if name == "max_body_bytes":
            parser.add_argument(
                "--max-body-mb",
                type=float,
                default=None,
                help=f"{field.description} In MB (default: {field.default / 2**20:g}).",
            )
            continue
        flag, annotation = "--" + name.replace("_", "-"), field.annotation
        if annotation is bool:
            parser.add_argument(flag, action="store_true", default=None, help=field.description)
        elif get_origin(annotation) is Literal:
            parser.add_argument(
                flag, choices=get_args(annotation), default=None, help=f"{field.description} (default: {field.default})"
            )
        else:
            kind = next(t for t in (int, float, str) if t is annotation or t in get_args(annotation))
            parser.add_argument(flag, type=kind, default=None, help=f"{field.description} (default: {field.default})")


def from_arguments(args) -> ServeSettings:
    values = {name: getattr(args, name) for name in ServeSettings.model_fields if getattr(args, name, None) is not None}
    if args.max_body_mb is not None:
        values["max_body_bytes"] = int(args.max_body_mb * 2**20)
    return ServeSettings(**values)
