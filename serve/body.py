"""Request bodies: JSON only, within a size limit checked before reading, and within a read time."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request


class BadRequest(Exception):
    """A request the server refuses with `status` and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


async def _read(request: Request, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check up front
        body += chunk
        if len(body) > max_bytes:
            raise BadRequest(413, f"body exceeds the limit of {max_bytes} bytes")
    return bytes(body)


async def read_body(request: Request, max_bytes: int, timeout_s: float, json_only: bool = True) -> bytes:
    """The raw body (JSON unless `json_only` is off), refused before it is read when it says (or
    turns out) to be too large, and cut off (408) when the client takes longer than `timeout_s`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if json_only and kind != "application/json":
        raise BadRequest(415, f"Content-Type must be application/json, got {kind or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BadRequest(413, f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return await asyncio.wait_for(_read(request, max_bytes), timeout_s)
    except TimeoutError:
        raise BadRequest(408, f"the body was not received within {timeout_s:g} s") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(400, "body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"body is not valid JSON ({err})") from None
