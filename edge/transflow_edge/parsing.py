"""Reading and checking request bodies: size limits, multipart, JSON inputs; errors as `ApiError`."""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request

from transflow_edge.model import LoadedModel, softmax
from transflow_edge.settings import Settings

log = logging.getLogger("transflow.edge")


class ApiError(Exception):
    """An error answered as `{"error": message}` with a 4xx (or 503) status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, file name, bytes) of each part, with the standard library's MIME parser."""
    try:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(400, "malformed multipart Content-Type header") from None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "malformed multipart body (no parts; is the boundary right?)")
    return [
        (
            part.get_param("name", header="content-disposition"),
            part.get_filename(),
            part.get_payload(decode=True) or b"",
        )
        for part in message.iter_parts()
    ]


def _check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes, more than the limit of {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or streamed)."""
    _check_declared_size(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_archive(request: Request, path: Path, limit: int) -> None:
    """The uploaded bundle to `path`: a raw body streams to disk; multipart takes its one file part."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        files = [
            data
            for _, filename, data in parse_multipart(content_type, await read_body(request, limit))
            if filename is not None
        ]
        if len(files) != 1:
            raise ApiError(422, f"expected exactly one file in the multipart body, got {len(files)}")
        path.write_bytes(files[0])
    else:
        _check_declared_size(request, limit)
        size = 0
        with path.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"bundle archive larger than the limit of {limit} bytes")
                fh.write(chunk)
    if path.stat().st_size == 0:
        raise ApiError(400, "empty body: send the bundle .tar.gz as the request body")


def parse_inputs(body: bytes, content_type: str, modality: str) -> list[Any]:
    """The list of raw inputs of a predict request, or a 4xx saying what is wrong with it."""
    if content_type.lower().startswith("multipart/form-data"):
        if modality != "image":
            raise ApiError(422, 'file uploads are for image models; this model takes text: send {"inputs": ["..."]}')
        items: list[Any] = [data for _, filename, data in parse_multipart(content_type, body) if filename is not None]
        if not items:
            raise ApiError(422, "no image files in the multipart body")
        return items
    if not body:
        raise ApiError(400, 'empty body: send JSON {"inputs": [...]}')
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ApiError(422, 'expected a JSON object {"inputs": [...]}')
    items = payload["inputs"]
    if not isinstance(items, list):
        raise ApiError(422, f'"inputs" must be a list, got {type(items).__name__}')
    return items


def check_inputs(items: list[Any], modality: str, settings: Settings) -> None:
    if not items:
        raise ApiError(422, '"inputs" is empty')
    if len(items) > settings.max_items:
        raise ApiError(413, f"{len(items)} inputs, more than the limit of {settings.max_items} per request")
    for i, item in enumerate(items):
        if modality == "text" and not isinstance(item, str):
            raise ApiError(422, f"inputs[{i}]: expected a string, got {type(item).__name__} (this model takes text)")
        if modality == "text" and len(item) > settings.max_text_chars:
            raise ApiError(
                413, f"inputs[{i}]: {len(item)} characters, more than the limit of {settings.max_text_chars}"
            )
        if modality == "image" and not isinstance(item, str | bytes):
            raise ApiError(422, f"inputs[{i}]: expected a base64-encoded image, got {type(item).__name__}")


def predictions(model: LoadedModel, logits: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for row in softmax(logits):
        top = int(np.argmax(row))
        out.append(
            {
                "label": model.labels[top],
                "score": float(row[top]),
                "scores": {label: float(p) for label, p in zip(model.labels, row, strict=True)},
            }
        )
    return out
