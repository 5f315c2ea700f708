"""The Open Inference Protocol's inference request and response, as Triton and KServe
speak them over HTTP, with the binary tensor data extension (what tritonclient sends by
default): a JSON header of `Inference-Header-Content-Length` bytes, then each tensor
whose parameters carry `binary_data_size` as raw bytes, in order.

BYTES elements in binary form are a 4-byte little-endian length, then the bytes; FP32 is
little-endian float32, row-major. Requests and responses are plain data here; the HTTP
handlers live in serving/app.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


class ProtocolError(Exception):
    """The request breaks the protocol; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


@dataclass
class ParsedRequest:
    id: str | None
    input_name: str
    texts: list[str]
    # Output name -> whether it goes back as binary data.
    outputs: dict[str, bool]


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _decode_bytes_tensor(raw: bytes, name: str) -> list[str]:
    texts, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(400, f"input {name!r}: binary data ends inside an element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ProtocolError(400, f"input {name!r}: element {len(texts)} runs past the data")
        try:
            texts.append(raw[offset : offset + size].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ProtocolError(
                422, f"input {name!r}: element {len(texts)} is not UTF-8 text ({err.reason})"
            ) from None
        offset += size
    return texts


def parse_infer(body: bytes, header_length: str | None, outputs_known: list[str]) -> ParsedRequest:
    """The texts and the outputs wanted from an inference request body."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(
                400,
                f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                f"{len(body)}-byte body",
            )
        header, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        header, binary = body, b""
    try:
        request = InferRequest.model_validate(json.loads(header))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(400, f"invalid JSON: {err}") from None
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise ProtocolError(422, problems) from None
    if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
        raise ProtocolError(422, "expected exactly one input, of datatype BYTES, holding the texts")
    tensor = request.inputs[0]
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(binary):
            raise ProtocolError(
                400,
                f"input {tensor.name!r}: binary_data_size {binary_size!r} does not match the "
                f"{len(binary)} bytes after the JSON header",
            )
        texts = _decode_bytes_tensor(binary, tensor.name)
    elif tensor.data is None:
        raise ProtocolError(422, f"input {tensor.name!r} has neither data nor binary_data_size")
    else:
        texts = _flatten(tensor.data)
        if not all(isinstance(t, str) for t in texts):
            raise ProtocolError(422, f"input {tensor.name!r}: every element must be a string")
    if int(np.prod(tensor.shape)) != len(texts) or len(tensor.shape) not in (1, 2):
        raise ProtocolError(
            422,
            f"input {tensor.name!r}: shape {tensor.shape} does not match {len(texts)} elements",
        )
    all_binary = bool((request.parameters or {}).get("binary_data_output", False))
    if request.outputs is None:
        wanted = {name: all_binary for name in outputs_known}
    else:
        wanted = {}
        for output in request.outputs:
            if output.name not in outputs_known:
                raise ProtocolError(
                    400, f"unknown output {output.name!r}; the outputs are {outputs_known}"
                )
            wanted[output.name] = bool((output.parameters or {}).get("binary_data", all_binary))
    return ParsedRequest(request.id, tensor.name, texts, wanted)


def encode_bytes_tensor(values: list[str]) -> bytes:
    parts = []
    for value in values:
        encoded = value.encode("utf-8")
        parts.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(parts)


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, tuple[str, list[int], np.ndarray | list[str]]],
    binary: dict[str, bool],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it.

    `outputs`: name -> (datatype, shape, values), in the order to send."""
    tensors, blobs = [], []
    for name, (datatype, shape, values) in outputs.items():
        if name not in binary:
            continue
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary[name]:
            blob = (
                encode_bytes_tensor(list(values))
                if datatype == "BYTES"
                else np.ascontiguousarray(values, dtype="<f4").tobytes()
            )
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = (
                list(values) if datatype == "BYTES" else np.asarray(values).ravel().tolist()
            )
        tensors.append(tensor)
    header: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": tensors,
    }
    if request_id is not None:
        header["id"] = request_id
    encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)
