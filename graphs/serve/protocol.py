"""The Open Inference Protocol (KServe v2 REST) for routing models: parse an infer request, encode its response.

JSON tensors and the binary tensor data extension in both directions, as Triton Inference Server speaks them:
a request or response whose JSON part is followed by raw tensor bytes says so with the header
``Inference-Header-Content-Length`` (the JSON part's length), and each binary tensor carries
``parameters.binary_data_size``. Every problem raises ``ProtocolError`` with the status code to answer and a
message that names the field, so a bad request is refused before it can join a batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ml_dtypes
import msgspec
import numpy as np
import orjson
import rapidjson

HEADER_LENGTH = "inference-header-content-length"
INPUT_NAME = "gating_output"
# Logit datatypes; FP16 and BF16 travel as binary only, as in Triton (JSON numbers are FP32 at best here).
INPUT_DATATYPES = {"FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
JSON_INPUT_DATATYPES = ("FP32",)
# Text of the data list converted at a time: its Python numbers (about 7 MB for 1 MiB of text) are all the memory
# the conversion takes beyond its float32 result, whatever the size of the body.
DATA_CHUNK_BYTES = 1 << 20
# What a list of numbers is written with; the first other byte names the kind of JSON value found.
_NUMBER_TEXT = b"0123456789+-.eE,[] \t\n\r"
_JSON_KINDS = {ord('"'): "str", ord("{"): "dict", ord("n"): "NoneType", ord("t"): "bool", ord("f"): "bool"}
_ROWS = re.compile(rb"[ \t\n\r]*\[")
_ROW_END = re.compile(rb"\][ \t\n\r]*,")
_COMMA = re.compile(rb",")
OUTPUT_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}


class ProtocolError(Exception):
    """A request the protocol or the model cannot take: ``status`` is the HTTP code, ``reason`` a metrics label."""

    def __init__(self, status: int, message: str, reason: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason

    def __reduce__(self):
        # Raised in the parser's process too: it must cross back whole.
        return ProtocolError, (self.status, self.message, self.reason)


@dataclass(frozen=True)
class ModelSignature:
    """What a served model accepts and can return."""

    name: str
    num_experts: int
    outputs: dict[str, str]  # output name -> its datatype
    max_tokens: int


@dataclass
class InferRequest:
    id: str | None
    logits: np.ndarray  # [T, E] in the datatype it came in
    outputs: list[tuple[str, bool]]  # (name, as binary) in the order asked for


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    # Plain decimal digits only: int() would also take "2_12", " 7" or "+7".
    if not (header_length.isascii() and header_length.isdigit()):
        raise _bad(f"Inference-Header-Content-Length={header_length!r} is not a non-negative decimal integer")
    length = int(header_length)
    if not 0 <= length <= len(body):
        raise _bad(f"Inference-Header-Content-Length={length} is out of range: allowed 0..{len(body)} (the body size)")
    return body[:length], memoryview(body)[length:]


def _load(text: bytes) -> object:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Triton's own clients write NaN and Infinity (rapidjson), which are not JSON and orjson refuses: text
        # orjson cannot read is read again by rapidjson, which takes them (and integers or exponents beyond a
        # float64, which orjson refuses too), and refuses what is malformed.
        try:
            return rapidjson.loads(text, number_mode=rapidjson.NM_NAN)
        except (ValueError, RecursionError, OverflowError) as error:
            raise _bad(f"malformed JSON in the request: {error}") from None


# What an input's ``data`` is read as: its JSON text (``msgspec.Raw``), or a flat list of numbers.
Data = TypeVar("Data")


class _Tensor(msgspec.Struct, Generic[Data]):
    """An input as the request's outline holds it."""

    name: Any = msgspec.UNSET
    shape: Any = msgspec.UNSET
    datatype: Any = msgspec.UNSET
    parameters: Any = msgspec.UNSET
    data: Data | msgspec.UnsetType = msgspec.UNSET


class _Outline(msgspec.Struct, Generic[Data]):
    """The fields of a request that the parser reads; any others are skipped (after being checked as JSON)."""

    inputs: list[_Tensor[Data]]
    id: Any = msgspec.UNSET
    parameters: Any = msgspec.UNSET
    outputs: Any = msgspec.UNSET


# Each input's data kept as its JSON text, converted in chunks later.
_OUTLINE = msgspec.json.Decoder(_Outline[msgspec.Raw])
# The usual request with flat data, read in one pass that also checks every element is a number.
_NUMBERS = msgspec.json.Decoder(_Outline[list[int | float]])


def _present(struct: msgspec.Struct) -> dict:
    return {name: value for name in struct.__struct_fields__ if (value := getattr(struct, name)) is not msgspec.UNSET}


def _parse_json(text: bytes) -> dict:
    """The request as a dict. A body larger than one chunk that has the usual outline (an object whose
    ``inputs`` are objects) keeps each input's ``data`` as JSON text (``msgspec.Raw``, a view of the body),
    converted in chunks later: as Python numbers, a large body would take about 11 times its size. A smaller one
    whose ``data`` are flat lists of numbers has them as float32 arrays at once (the numbers are the Python ints
    and floats the general reading makes, so the values are the same). Anything else (a binary request's header,
    which orjson reads quicker; NaN tokens in the data, rows, another outline, malformed JSON) is read whole, and
    refused with the reason where it is wrong."""
    if len(text) > DATA_CHUNK_BYTES:
        try:
            outline = _OUTLINE.decode(text)
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            return {**_present(outline), "inputs": [_present(tensor) for tensor in outline.inputs]}
    elif b'"data"' in text:
        try:
            numbers = _NUMBERS.decode(text)
            return {**_present(numbers), "inputs": [_numbers_tensor(tensor) for tensor in numbers.inputs]}
        except (msgspec.DecodeError, RecursionError, OverflowError):
            # An integer beyond a float64 overflows the conversion: the general reading names it.
            pass
    document = _load(text)
    if not isinstance(document, dict):
        raise _bad(f"the request must be a JSON object, got {type(document).__name__}")
    return document


def _numbers_tensor(tensor: _Tensor[list[int | float]]) -> dict:
    present = _present(tensor)
    if "data" in present:
        # Numbers beyond float32's range are valid logits of infinite size.
        with np.errstate(over="ignore"):
            present["data"] = np.asarray(present["data"], dtype=np.float32)
    return present


def _shape(tensor: dict, signature: ModelSignature) -> tuple[int, int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"input {INPUT_NAME} needs 'shape', a list of integers; got {shape!r}")
    if len(shape) != 2:
        raise _bad(f"input {INPUT_NAME} has rank {len(shape)} (shape {shape}): expected rank 2, [T, E]")
    tokens, experts = shape
    if experts != signature.num_experts:
        raise _bad(
            f"input {INPUT_NAME} has width E={experts}: model {signature.name} expects E={signature.num_experts}"
        )
    if not 0 <= tokens <= signature.max_tokens:
        raise _bad(f"input {INPUT_NAME} has T={tokens} tokens: allowed 0 <= T <= {signature.max_tokens}")
    return tokens, experts


def _tensor_data(tensor: dict, shape: tuple[int, int], binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in INPUT_DATATYPES:
        raise _bad(f"input {INPUT_NAME} has datatype {datatype!r}: allowed {', '.join(INPUT_DATATYPES)}")
    dtype = INPUT_DATATYPES[datatype]
    count = shape[0] * shape[1]
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad(f"input {INPUT_NAME}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise _bad(f"input {INPUT_NAME} has both 'data' and binary_data_size: send one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"input {INPUT_NAME}: binary_data_size={size!r} must be a non-negative integer")
        if size != count * dtype.itemsize:
            raise _bad(
                f"input {INPUT_NAME}: binary_data_size={size} does not match shape {list(shape)} of {datatype} "
                f"({count * dtype.itemsize} bytes)"
            )
        if offset + size > len(binary):
            raise _bad(
                f"input {INPUT_NAME}: binary_data_size={size} runs past the binary data after the JSON header "
                f"({len(binary) - offset} bytes left)"
            )
        return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape), offset + size
    if "data" not in tensor:
        raise _bad(f"input {INPUT_NAME} has neither 'data' nor parameters.binary_data_size")
    if datatype not in JSON_INPUT_DATATYPES:
        raise _bad(f"input {INPUT_NAME}: datatype {datatype} is accepted as binary tensor data only, not in JSON")
    return _json_numbers(tensor["data"], shape), offset


def _json_numbers(data: object, shape: tuple[int, int]) -> np.ndarray:
    """``data`` as float32 ``shape``: a flat list of numbers, or a list of rows of numbers.

    The element types are checked first (one pass in C), since a float conversion would take strings, ``null``
    and booleans as numbers."""
    if isinstance(data, msgspec.Raw):
        return _json_text_numbers(memoryview(data), shape)
    if isinstance(data, np.ndarray):
        count = shape[0] * shape[1]
        if data.size != count:
            raise _bad(f"input {INPUT_NAME}: 'data' holds {data.size} values, shape {list(shape)} needs {count}")
        return data.reshape(shape)
    if not isinstance(data, list):
        raise _bad(f"input {INPUT_NAME}: 'data' must be a list of numbers, got {type(data).__name__}")
    kinds = set(map(type, data))
    if kinds == {list}:
        kinds = set().union(*(map(type, row) for row in data))
    if not kinds <= {float, int}:
        found = ", ".join(sorted(k.__name__ for k in kinds - {float, int}))
        raise _bad(f"input {INPUT_NAME}: 'data' must hold numbers, flat or in rows of {shape[1]}; found {found}")
    try:
        # Numbers beyond float32's range are valid logits of infinite size.
        with np.errstate(over="ignore"):
            array = np.asarray(data, dtype=np.float32)
    except (ValueError, OverflowError) as error:
        raise _bad(f"input {INPUT_NAME}: 'data' cannot be read as float32 {list(shape)}: {error}") from None
    count = shape[0] * shape[1]
    if array.ndim > 1 and array.shape != shape:
        raise _bad(f"input {INPUT_NAME}: 'data' is nested as {list(array.shape)}: flat or {list(shape)} allowed")
    if array.size != count:
        raise _bad(f"input {INPUT_NAME}: 'data' holds {array.size} values, shape {list(shape)} needs {count}")
    return array.reshape(shape)


def _json_text_numbers(text: memoryview, shape: tuple[int, int]) -> np.ndarray:
    """``data`` given as the JSON text of a valid value (checked by the outline's decoder), converted about
    ``DATA_CHUNK_BYTES`` of text at a time into one float32 array: the Python numbers of one chunk are all the
    memory the conversion takes beyond its result.

    A chunk ends at a separator of the outer list: at a comma for a flat list; after a row's ``]`` for rows.
    Chunks are checked to hold nothing but numbers, commas, brackets and spaces before they are split, so a
    string cannot hide a separator; a list nested otherwise than flat or in rows of ``E`` splits into chunks
    that are malformed, ragged or of the wrong depth, each refused."""
    if bytes(text[:1]) != b"[":
        raise _bad(f"input {INPUT_NAME}: 'data' must be a list of numbers, got {type(_load(text)).__name__}")
    rows = _ROWS.match(text, 1) is not None
    separator = _ROW_END if rows else _COMMA
    count = shape[0] * shape[1]
    out = np.empty(count, dtype=np.float32)
    filled, start, end = 0, 1, len(text) - 1
    while start < end:
        found = separator.search(text, min(start + DATA_CHUNK_BYTES, end), end)
        stop = found.end() - 1 if found is not None else end
        piece = bytes(text[start:stop])
        other = piece.translate(None, _NUMBER_TEXT)
        if other:
            found_kind = _JSON_KINDS.get(other[0], "other")
            raise _bad(
                f"input {INPUT_NAME}: 'data' must hold numbers, flat or in rows of {shape[1]}; found {found_kind}"
            )
        nested_otherwise = _bad(f"input {INPUT_NAME}: 'data' is nested otherwise than flat or as {list(shape)}")
        try:
            values = _load(b"[" + piece + b"]")
        except ProtocolError as error:
            # A chunk of valid JSON text that does not read: split inside a list nested otherwise, or holding a
            # number beyond a float64.
            raise _bad(f"{nested_otherwise.message}, or holds a number beyond a float64 ({error.message})") from None
        try:
            with np.errstate(over="ignore"):
                array = np.asarray(values, dtype=np.float32)
        except ValueError:
            raise nested_otherwise from None
        except OverflowError as error:
            raise _bad(f"input {INPUT_NAME}: 'data' holds a number that cannot be read as float32: {error}") from None
        if array.ndim != (2 if rows else 1) or (rows and array.shape[1] != shape[1]):
            raise nested_otherwise
        if filled + array.size > count:
            raise _bad(f"input {INPUT_NAME}: 'data' holds more than the {count} values shape {list(shape)} needs")
        # The next chunk's numbers are made before the name is bound again: only one chunk's are held.
        del values
        out[filled : filled + array.size] = array.reshape(-1)
        filled += array.size
        start = stop + 1
    if filled != count:
        raise _bad(f"input {INPUT_NAME}: 'data' holds {filled} values, shape {list(shape)} needs {count}")
    return out.reshape(shape)


def _flag(parameters: dict, key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{where}: {key}={value!r} must be true or false")
    return value


def _requested_outputs(document: dict, signature: ModelSignature) -> list[tuple[str, bool]]:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("request 'parameters' must be an object")
    all_binary = _flag(parameters, "binary_data_output", False, "request parameters")
    asked = document.get("outputs")
    if asked is None:
        return [(name, all_binary) for name in signature.outputs]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise _bad("'outputs' must be a list of objects with a 'name'")
    out, seen = [], set()
    for entry in asked:
        name = entry.get("name")
        if not isinstance(name, str) or name not in signature.outputs:
            raise _bad(f"unknown output {name!r}: model {signature.name} offers {', '.join(signature.outputs)}")
        if name in seen:
            raise _bad(f"output {name!r} is asked for twice")
        seen.add(name)
        entry_parameters = entry.get("parameters") or {}
        if not isinstance(entry_parameters, dict):
            raise _bad(f"output {name}: 'parameters' must be an object")
        out.append((name, _flag(entry_parameters, "binary_data", all_binary, f"output {name} parameters")))
    return out


def parse_infer(body: bytes, header_length: str | None, signature: ModelSignature) -> InferRequest:
    """Validate and decode an infer request for ``signature``; raise ``ProtocolError`` on anything wrong."""
    text, binary = _split_body(body, header_length)
    document = _parse_json(text)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise _bad(f"'inputs' must be a non-empty list of tensors; model {signature.name} takes {INPUT_NAME}")
    names = [t.get("name") for t in inputs]
    unknown = [n for n in names if n != INPUT_NAME]
    if unknown:
        raise _bad(f"unknown input {unknown[0]!r}: model {signature.name} takes one input, {INPUT_NAME}")
    if len(names) != 1:
        raise _bad(f"input {INPUT_NAME} is given {len(names)} times")
    tensor = inputs[0]
    shape = _shape(tensor, signature)
    logits, used = _tensor_data(tensor, shape, binary, 0)
    if used != len(binary):
        raise _bad(
            f"the binary data after the JSON header is {len(binary)} bytes, but the inputs' binary_data_size "
            f"values add up to {used}"
        )
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"'id' must be a string, got {type(request_id).__name__}")
    return InferRequest(request_id, logits, _requested_outputs(document, signature))


def parse_request(body: bytes, header_length: str | None, signature: ModelSignature | None) -> InferRequest | None:
    """``parse_infer`` with anything it raises turned into a 400; no ``signature``: only load the parser."""
    if signature is None:
        return None
    try:
        return parse_infer(body, header_length, signature)
    except ProtocolError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a body breaks in the parser, it is the body's fault
        raise ProtocolError(400, f"the request could not be read: {type(error).__name__}: {error}") from None


def encode_infer_response(
    model: str, request_id: str | None, outputs: Sequence[tuple[str, np.ndarray, bool]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; outputs marked binary follow the JSON part in the order listed."""
    tensors, blobs = [], []
    for name, array, binary in outputs:
        tensor = {"name": name, "datatype": OUTPUT_DATATYPES[array.dtype], "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = np.ascontiguousarray(array).reshape(-1)
        tensors.append(tensor)
    document = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request_id is not None:
        document["id"] = request_id
    head = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
    }
