"""Reading and checking request bodies; every refusal is an `ApiError` (a 4xx with a JSON message).

The event loop only moves bytes: it counts them (413 past the limit) and, for multipart bodies, counts part
delimiters with `bytes.count` (413 past `max_items`) while the body streams in. Parsing (JSON with ijson's
streaming C parser, multipart with python-multipart's streaming parser) runs on a worker thread and stops at
the first offending item, so its cost is bounded by the limits, not by what the client sent.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import ijson
import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from transflow_edge.model import LoadedModel, softmax
from transflow_edge.settings import Settings

# python-multipart logs a warning for every malformed body: a client could fill the disk with them.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

MULTIPART = "multipart/form-data"
JSON_BUFFER = 1 << 16
JSON_TYPES = {"start_map": "dict", "start_array": "list", "boolean": "bool", "null": "NoneType"}


class ApiError(Exception):
    """An error answered as `{"error": message}` with a 4xx (or 503) status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def is_multipart(content_type: str) -> bool:
    return content_type.lower().startswith(MULTIPART)


def boundary_of(content_type: str) -> bytes:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:  # RFC 2046: at most 70 characters
        raise ApiError(400, "malformed multipart Content-Type header (no usable boundary)")
    return boundary


def _check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes, more than the limit of {limit}")


class _PartCounter:
    """Counts multipart delimiters across chunk edges; the body's parts are one fewer than its delimiters."""

    def __init__(self, boundary: bytes, max_parts: int) -> None:
        self.delimiter, self.max_parts = b"--" + boundary, max_parts
        self.tail, self.count = b"", 0

    def feed(self, chunk: bytes) -> None:
        window = self.tail + chunk
        self.count += window.count(self.delimiter)
        self.tail = window[-(len(self.delimiter) - 1) :]
        if self.count > self.max_parts + 1:
            raise ApiError(413, f"more than {self.max_parts} parts in the multipart body, the limit per request")


async def read_body(request: Request, limit: int, max_parts: int | None = None) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed), or, when it is
    multipart and `max_parts` is given, as soon as it holds more parts than that."""
    _check_declared_size(request, limit)
    content_type = request.headers.get("content-type", "")
    counter = _PartCounter(boundary_of(content_type), max_parts) if max_parts and is_multipart(content_type) else None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than the limit of {limit} bytes")
        if counter is not None:
            counter.feed(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- multipart (python-multipart)


class _Parts:
    """python-multipart callbacks: file parts go to `on_file(data)` piece by piece; other fields are dropped."""

    def __init__(self, max_parts: int, on_file_start: Callable[[], None], on_file_data: Callable[[bytes], None]):
        self.max_parts, self.on_file_start, self.on_file_data = max_parts, on_file_start, on_file_data
        self.parts, self.is_file, self.field, self.value, self.headers = 0, False, b"", b"", {}

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add("field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
        }

    def _add(self, name: str, piece: bytes) -> None:
        value = getattr(self, name) + piece
        if len(value) > 4096:
            raise ApiError(400, "multipart part header too long")
        setattr(self, name, value)

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise ApiError(413, f"more than {self.max_parts} parts in the multipart body, the limit per request")
        self.is_file, self.headers = False, {}

    def _header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.is_file = b"filename" in params
        if self.is_file:
            self.on_file_start()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            self.on_file_data(data[start:end])


def _multipart_parser(content_type: str, parts: _Parts) -> MultipartParser:
    return MultipartParser(boundary_of(content_type), parts.callbacks())  # type: ignore[arg-type]


def _finish(parser: MultipartParser) -> None:
    parser.finalize()
    if parser.state != 12:  # MultipartState.END: the closing delimiter was seen
        raise ApiError(400, "malformed multipart body (incomplete; is the boundary right?)")


def parse_multipart_files(content_type: str, body: bytes, max_parts: int) -> list[bytes]:
    """The file parts' bytes (fields without a filename are ignored)."""
    files: list[bytearray] = []
    parts = _Parts(max_parts, lambda: files.append(bytearray()), lambda piece: files[-1].extend(piece))
    parser = _multipart_parser(content_type, parts)
    try:
        parser.write(body)
        _finish(parser)
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart body ({exc})") from None
    return [bytes(f) for f in files]


# ---------------------------------------------------------------- JSON inputs (ijson)


def parse_json_inputs(body: bytes, settings: Settings, text: bool = True) -> list[str]:
    """`{"inputs": [str, ...]}` read event by event: the first non-string item, unknown key, item past
    `max_items` or (`text`) text past `max_text_chars` is refused before the rest of the body is looked at.

    `basic_parse` keeps no path prefixes (their cost grows with nesting depth); events come 1 MB of body at a
    time, so a refusal stops after the first megabyte while long strings still parse at C speed."""
    if not body.strip():
        raise ApiError(400, 'empty body: send JSON {"inputs": [...]}')
    items: list[str] = []
    depth, seen_inputs = 0, False  # 1: in the top object, 2: in the "inputs" list
    try:
        for event, value in ijson.basic_parse(io.BytesIO(body), buf_size=JSON_BUFFER, use_float=True):
            if depth == 2:
                if event == "end_array":
                    depth = 1
                else:
                    _take_item(items, event, value, settings, text)
            elif depth == 1:
                if event == "map_key":
                    if value != "inputs" or seen_inputs:
                        key = str(value)[:40]
                        raise ApiError(422, f'unexpected key {key!r}: expected a JSON object {{"inputs": [...]}}')
                    seen_inputs = True
                elif event == "start_array":
                    depth = 2
                elif event != "end_map":
                    raise ApiError(422, f'"inputs" must be a list, got {_json_type(event, value)}')
            elif event == "start_map":
                depth = 1
            else:
                raise ApiError(422, 'expected a JSON object {"inputs": [...]}')
    except (ijson.JSONError, ValueError):  # ValueError: an integer literal longer than Python parses
        raise ApiError(400, "request body is not valid JSON") from None
    if not seen_inputs:
        raise ApiError(422, 'expected a JSON object {"inputs": [...]}')
    return items


def _json_type(event: str, value: Any) -> str:
    if event == "number":
        return "int" if isinstance(value, int) else "float"
    return JSON_TYPES.get(event, "str" if event == "string" else event)


def _take_item(items: list[str], event: str, value: Any, settings: Settings, text: bool) -> None:
    index = len(items)
    if event == "end_array":
        return
    if event != "string":
        raise ApiError(422, f"inputs[{index}]: expected a string, got {_json_type(event, value)}")
    if index >= settings.max_items:
        raise ApiError(413, f"more than {settings.max_items} inputs, the limit of {settings.max_items} per request")
    if text and len(value) > settings.max_text_chars:
        raise ApiError(
            413, f"inputs[{index}]: {len(value)} characters, more than the limit of {settings.max_text_chars}"
        )
    items.append(value)


def parse_inputs(body: bytes, content_type: str, model: LoadedModel, settings: Settings) -> list[Any]:
    """The raw inputs of a predict request (worker thread), or a 4xx saying what is wrong with them."""
    if is_multipart(content_type):
        items: list[Any] = parse_multipart_files(content_type, body, settings.max_items)
        if not items:
            raise ApiError(422, "no image files in the multipart body")
    else:
        items = parse_json_inputs(body, settings, text=model.modality == "text")
    if not items:
        raise ApiError(422, '"inputs" is empty')
    return items


def check_predict_type(content_type: str, model: LoadedModel) -> None:
    """Before reading the body: file uploads are for image models."""
    if is_multipart(content_type) and model.modality != "image":
        raise ApiError(422, 'file uploads are for image models; this model takes text: send {"inputs": ["..."]}')


# ---------------------------------------------------------------- bundle uploads


async def receive_archive(request: Request, path: Path, limit: int, limiter: anyio.CapacityLimiter) -> None:
    """The uploaded bundle to `path`, streamed to disk (a raw body, or the one file part of a multipart body);
    disk writes and multipart parsing run on worker threads."""
    _check_declared_size(request, limit)
    content_type = request.headers.get("content-type", "")
    files = 0
    with path.open("wb") as out:
        write: Callable[[bytes], Any] = out.write
        parser = None
        if is_multipart(content_type):

            def started() -> None:
                nonlocal files
                files += 1

            def first_file_only(piece: bytes) -> None:
                if files == 1:
                    out.write(piece)

            parts = _Parts(16, started, first_file_only)
            parser = _multipart_parser(content_type, parts)
            write = parser.write
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"bundle archive larger than the limit of {limit} bytes")
                await anyio.to_thread.run_sync(write, chunk, limiter=limiter)
            if parser is not None:
                _finish(parser)
        except MultipartParseError as exc:
            raise ApiError(400, f"malformed multipart body ({exc})") from None
    if parser is not None and files != 1:
        raise ApiError(422, f"expected exactly one file in the multipart body, got {files}")
    if path.stat().st_size == 0:
        raise ApiError(400, "empty body: send the bundle .tar.gz as the request body")


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
