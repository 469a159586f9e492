"""Open Inference Protocol (KServe v2 / Triton HTTP) routes, alongside `/v1`: what existing clients speak.

    GET  /v2                          server metadata
    GET  /v2/health/live · ready      liveness · readiness (503 while no model is loaded)
    GET  /v2/models/{name}[/ready]    model metadata · readiness
    POST /v2/models/{name}/infer      one BYTES input: texts (UTF-8) or encoded images

An infer request is JSON (BYTES data as strings: texts, or base64-encoded images), or the binary extension
(`Inference-Header-Content-Length`: JSON header, then each BYTES element as a 4-byte little-endian length
and its bytes). Outputs, always as JSON: `logits` and `probabilities` (FP32 [n, classes]), `label` (BYTES [n]).

The JSON header is built from ijson events with a budget of events, so its size in memory is bounded by the
item limit whatever the body holds; it is parsed on a worker thread, like every body.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import ijson
import numpy as np
from ijson.common import ObjectBuilder

from transflow_edge.model import LoadedModel, softmax
from transflow_edge.parsing import JSON_BUFFER, ApiError
from transflow_edge.settings import Settings

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("logits", "probabilities", "label")
EXTRA_EVENTS = 200  # keys, shapes, parameters and outputs around the data elements


def bounded_json(raw: bytes, max_events: int) -> Any:
    """json.loads, but refused (413) past `max_events` parse events: memory bounded by the budget."""
    builder = ObjectBuilder()
    try:
        for count, (event, value) in enumerate(
            ijson.basic_parse(io.BytesIO(raw), buf_size=JSON_BUFFER, use_float=True), start=1
        ):
            if count > max_events:
                raise ApiError(413, f"inference request JSON has more than {max_events} values")
            builder.event(event, value)
    except (ijson.JSONError, ValueError):
        raise ApiError(400, "inference request header is not valid JSON") from None
    if not hasattr(builder, "value"):
        raise ApiError(400, "empty body: send an inference request")
    return builder.value


def _bytes_elements(raw: bytes, limit: int) -> list[bytes]:
    """BYTES tensor data of the binary extension: (4-byte little-endian length, bytes) per element."""
    items, offset = [], 0
    while offset < len(raw):
        if len(items) >= limit:
            raise ApiError(413, f"more than {limit} inputs, the limit per request")
        if offset + 4 > len(raw):
            raise ApiError(400, "binary BYTES data: truncated length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + size > len(raw):
            raise ApiError(400, "binary BYTES data: element longer than the data")
        items.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return items


def parse_infer(body: bytes, header_length: str | None, model: LoadedModel, settings: Settings) -> dict[str, Any]:
    """The request's id, its input items (texts or image bytes) and the outputs asked for; a 4xx otherwise."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"{HEADER_LENGTH}: not a length within the body")
        split = int(header_length)
    request = bounded_json(body[:split], 4 * settings.max_items + EXTRA_EVENTS)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise ApiError(422, 'expected {"inputs": [one BYTES input]}')
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES":
        raise ApiError(422, "inputs[0]: datatype must be BYTES (texts, or encoded images)")
    params = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(body) - split:
            raise ApiError(400, "inputs[0]: binary_data_size does not match the binary data sent")
        raw = _bytes_elements(body[split:], settings.max_items)
        items: list[Any] = raw if model.modality == "image" else [_utf8(x, i) for i, x in enumerate(raw)]
    else:
        data = tensor.get("data")
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
            data = data[0]  # [[...]]: a batch given as one row
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ApiError(422, "inputs[0]: data must be a list of strings (texts, or base64-encoded images)")
        items = data
    if not items:
        raise ApiError(422, "inputs[0]: no data")
    if len(items) > settings.max_items:
        raise ApiError(413, f"{len(items)} inputs, more than the limit of {settings.max_items} per request")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape) or int(np.prod(shape)) != len(items):
        raise ApiError(422, f"inputs[0]: shape {shape!r:.40} does not hold {len(items)} elements")
    if model.modality == "text":
        for i, text in enumerate(items):
            if len(text) > settings.max_text_chars:
                raise ApiError(413, f"inputs[{i}]: {len(text)} characters, more than {settings.max_text_chars}")
    return {"id": request.get("id"), "items": items, "outputs": _wanted(request.get("outputs"))}


def _utf8(raw: bytes, index: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, f"inputs[{index}]: text is not UTF-8") from None


def _wanted(outputs: Any) -> list[str]:
    if outputs is None:
        return list(OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ApiError(422, "outputs: must be a list of {name}")
    names = [o.get("name") for o in outputs]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ApiError(422, f"outputs: unknown {unknown!r:.80}; this model has {list(OUTPUTS)}")
    return names


def infer_response(model: LoadedModel, logits: np.ndarray, request_id: Any, outputs: list[str]) -> dict[str, Any]:
    n, classes = logits.shape
    tensors = {
        "logits": {"datatype": "FP32", "shape": [n, classes], "data": logits.astype(np.float32).ravel().tolist()},
        "probabilities": {
            "datatype": "FP32",
            "shape": [n, classes],
            "data": softmax(logits).astype(np.float32).ravel().tolist(),
        },
        "label": {"datatype": "BYTES", "shape": [n], "data": [model.labels[int(i)] for i in logits.argmax(1)]},
    }
    answer: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": [{"name": name, **tensors[name]} for name in outputs],
    }
    if isinstance(request_id, str):
        answer["id"] = request_id
    return answer


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    classes = len(model.labels)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.modality, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": model.labels, "bundle_sha256": model.bundle.sha256},
    }
