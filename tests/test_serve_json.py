"""The JSON tensor parser: ``data`` read from its text in chunks gives exactly what a whole-document parse gives,
refuses what that refuses, and takes memory of the order of the body, not of a Python number per value; the child
process that parses large bodies is replaced when it dies."""

from __future__ import annotations

import json
import os
import signal
import tracemalloc

import msgspec
import numpy as np
import pytest

pytest.importorskip("fastapi")

from graphs.serve import protocol  # noqa: E402
from graphs.serve.parser import ParserProcess  # noqa: E402
from graphs.serve.protocol import ModelSignature, ProtocolError, parse_infer  # noqa: E402

E = 8
SIGNATURE = ModelSignature("m", E, {"topk_values": "FP32"}, max_tokens=100_000)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few dozen bytes, so that every case crosses several chunk boundaries."""
    monkeypatch.setattr(protocol, "DATA_CHUNK_BYTES", 40)


def request_text(tokens: int, data_text: str, spaces: str = "") -> bytes:
    tensor = f'{{"name":"gating_output","shape":[{tokens},{E}],"datatype":"FP32",{spaces}"data":{spaces}{data_text}}}'
    return f'{{"id":"r","inputs":[{tensor}]}}'.encode()


def whole_parse(text: bytes) -> np.ndarray:
    """What the parser gave before chunks: the document read whole, its data converted in one go."""
    data = json.loads(text)["inputs"][0]["data"]
    with np.errstate(over="ignore"):
        return np.asarray(data, dtype=np.float32).reshape(-1, E)


def refusal(text: bytes) -> str:
    with pytest.raises(ProtocolError) as refused:
        parse_infer(text, None, SIGNATURE)
    assert refused.value.status == 400
    return refused.value.message


def logits_text(x: np.ndarray, rows: bool, separator: str = ",") -> str:
    def numbers(values) -> str:
        return "[" + separator.join(repr(float(v)) for v in values) + "]"

    if rows:
        return "[" + separator.join(numbers(row) for row in x) + "]"
    return numbers(x.reshape(-1))


@pytest.mark.parametrize("rows", [False, True], ids=["flat", "rows"])
@pytest.mark.parametrize("separator", [",", " ,\n ", ", "])
def test_chunked_data_equals_a_whole_parse(small_chunks, rows, separator):
    x = np.random.default_rng(1).standard_normal((9, E)) * 10.0 ** np.random.default_rng(2).integers(-40, 40, (9, E))
    text = request_text(9, logits_text(x, rows, separator), spaces=" \n")
    got = parse_infer(text, None, SIGNATURE)
    assert got.id == "r" and got.logits.dtype == np.float32
    np.testing.assert_array_equal(got.logits, whole_parse(text))


def test_integers_exponents_and_numbers_beyond_float32_read_as_before(small_chunks):
    values = ["0", "-0", "7", "-12", "1e39", "-1E39", "2e308", "3.5e-50", "123456789012345678901234567890", "0.1"]
    values += ["-2.5E+3", "1.0000001", "16777217", "-0.0", "1e-46", "340282356779733661637539395458142568448"]
    text = request_text(2, "[" + ",".join(values) + "]")
    with np.errstate(over="ignore"):
        expected = np.asarray([float(v) for v in values]).astype(np.float32).reshape(2, E)
    np.testing.assert_array_equal(parse_infer(text, None, SIGNATURE).logits, expected)


def test_triton_nan_and_infinity_tokens_are_read(small_chunks):
    text = request_text(1, "[NaN,Infinity,-Infinity,1,2,3,4,5]")
    got = parse_infer(text, None, SIGNATURE).logits
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == -np.inf


def test_no_tokens(small_chunks):
    for data in ("[]", "[ ]"):
        assert parse_infer(request_text(0, data), None, SIGNATURE).logits.shape == (0, E)


ROW = "[" + ",".join(["1"] * E) + "]"
FLAT = ",".join(["1"] * E)
REFUSED = {
    "a string late in a flat list": ("[" + FLAT + "," + FLAT[:-1] + '"1.5"]', "found str"),
    "a string holding separators": ("[" + FLAT + "," + FLAT[:-1] + '"1,2],[3"]', "found str"),
    "null in a row": ("[" + ROW + ",[" + ",".join(["1"] * (E - 1)) + ",null]]", "found NoneType"),
    "true in a flat list": ("[" + FLAT + "," + FLAT[:-1] + "true]", "found bool"),
    "an object in a flat list": ("[" + FLAT + "," + FLAT[:-1] + "{}]", "found dict"),
    "a row too short": ("[" + ROW + ",[1,2]]", "nested otherwise"),
    "a row too long": ("[" + ROW + ",[" + FLAT + ",1]]", "nested otherwise"),
    "rows nested deeper late": ("[" + ROW + ",[[" + FLAT + "]]]", "nested otherwise"),
    "a flat list turning into rows": ("[" + FLAT + "," + ROW + "]", "nested otherwise"),
    "rows turning into numbers": ("[" + ROW + "," + FLAT + "]", "nested otherwise"),
    "too few values": ("[" + FLAT + "]", "holds 8 values"),
    "too many values": ("[" + FLAT + "," + FLAT + "," + FLAT + "]", "holds more than"),
    "too many rows": ("[" + ROW + "," + ROW + "," + ROW + "]", "holds more than"),
    "an integer beyond a float64": ("[" + "9" * 310 + "," + FLAT + "," + FLAT[2:] + "]", "float32"),
    "data a string": ('"0.5"', "got str"),
    "data an object": ('{"a":[1]}', "got dict"),
    "data null": ("null", "got NoneType"),
    "an exponent beyond a float64": ("[1e999," + FLAT + "," + FLAT[2:] + "]", "beyond a float64"),
    "lists 5000 deep": ("[" * 5000 + "]" * 5000, "depth"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_malformed_data_is_refused(small_chunks, case):
    data, reason = REFUSED[case]
    assert reason in refusal(request_text(2, data))


def test_rows_nested_deeper_in_a_chunk_of_their_own_are_refused(small_chunks):
    # Three rows fill the first chunk; the last one, a level deeper, reads alone as a list of the right size.
    assert "nested otherwise" in refusal(request_text(4, "[" + ",".join([ROW] * 3) + ",[[" + FLAT + "]]]"))


def test_malformed_documents_are_refused():
    assert "malformed JSON" in refusal(request_text(1, "[" + FLAT + ",]"))
    assert "malformed JSON" in refusal(request_text(1, "[" + FLAT + "]") + b"x")
    assert "JSON object" in refusal(b"[1]")
    assert "'inputs'" in refusal(b'{"inputs":[1]}')


NUMBERS = ["0", "-0", "7", "-12", "1e39", "-1E39", "2e308", "3.5e-50", "123456789012345678901234567890", "0.1"]
NUMBERS += ["-2.5E+3", "1.0000001", "16777217", "-0.0", "1e-46", "340282356779733661637539395458142568448"]
NUMBERS += ["18446744073709551616", "-9223372036854775809", "1152921573326323713", "0.30000000000000004"]
DOCUMENTS = {
    "numbers of every form": request_text(2, "[" + ",".join(NUMBERS[:16]) + "]"),
    "numbers within a float64": request_text(
        2, "[" + ",".join([n for n in NUMBERS[:16] if n != "2e308"] + ["1"]) + "]"
    ),
    "integers beyond 64 bits": request_text(1, "[" + ",".join(NUMBERS[16:] + ["1"] * 4) + "]"),
    "rows": request_text(2, "[" + ROW + "," + ROW + "]"),
    "NaN tokens": request_text(1, "[NaN,Infinity,-Infinity,1,2,3,4,5]"),
    "no tokens": request_text(0, "[]"),
    "no data": b'{"inputs":[{"name":"gating_output","shape":[1,8],"datatype":"FP32"}]}',
    "JSON data of FP16": request_text(1, "[" + FLAT + "]").replace(b"FP32", b"FP16"),
    "a shape of three": request_text(1, "[" + FLAT + "]").replace(b"[1,8]", b"[1,8,1]"),
    "an id that is a number": request_text(1, "[" + FLAT + "]").replace(b'"r"', b"7"),
    "an id given twice": request_text(1, "[" + FLAT + "]").replace(b'"id":"r"', b'"id":"a","id":"b"'),
    "unknown fields": request_text(1, "[" + FLAT + "]").replace(b'"id"', b'"x":{"y":[null]},"id"'),
    "outputs asked as binary": request_text(1, "[" + FLAT + "]").replace(
        b'"id"', b'"outputs":[{"name":"topk_values","parameters":{"binary_data":true}}],"id"'
    ),
    "binary_data_output a string": request_text(1, "[" + FLAT + "]").replace(
        b'"id"', b'"parameters":{"binary_data_output":"false"},"id"'
    ),
    "inputs an object": b'{"inputs":{"name":"gating_output"}}',
    "two inputs": b'{"inputs":[{"name":"gating_output"},{"name":"gating_output"}]}',
    "not an object": b"[1]",
    "a trailing comma": request_text(1, "[" + FLAT + ",]"),
    **{f"data: {case}": request_text(2, data) for case, (data, _) in REFUSED.items()},
}


def _outcome(text: bytes) -> tuple:
    try:
        got = parse_infer(text, None, SIGNATURE)
    except ProtocolError as refused:
        return "refused", refused.status, refused.message
    return "read", got.id, got.outputs, got.logits.dtype, got.logits.shape, got.logits.tobytes()


@pytest.mark.parametrize("case", sorted(DOCUMENTS))
def test_a_small_body_read_in_one_pass_gives_what_the_general_reading_gives(monkeypatch, case):
    """A body of flat numbers is read in one pass into float32 (no Python number checked one by one): the same
    logits, or the same refusal, as the document read whole."""
    text = DOCUMENTS[case]
    one_pass = _outcome(text)
    monkeypatch.setattr(protocol, "_NUMBERS", msgspec.json.Decoder(type(None)))
    assert one_pass == _outcome(text)


def test_the_one_pass_reading_takes_flat_numbers_only():
    for case in ("numbers within a float64", "integers beyond 64 bits", "no data", "an id given twice"):
        assert protocol._NUMBERS.decode(DOCUMENTS[case]).inputs
    for case in ("rows", "NaN tokens", "numbers of every form", "data: true in a flat list", "data: data a string"):
        with pytest.raises(msgspec.DecodeError):
            protocol._NUMBERS.decode(DOCUMENTS[case])


def test_the_parse_takes_memory_of_the_order_of_its_result(monkeypatch):
    """As Python floats in lists, the values would take about 32 bytes each (about 19 MB at the peak of a parse of
    the whole document here): the chunked parse holds the float32 result (4 bytes a value) and the Python
    numbers of one chunk (about 7 times its text)."""
    monkeypatch.setattr(protocol, "DATA_CHUNK_BYTES", 16 << 10)
    x = np.random.default_rng(3).standard_normal((20_000, E)).round(3)
    text = request_text(20_000, logits_text(x, rows=True))
    tracemalloc.start()
    try:
        parse_infer(text, None, SIGNATURE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * x.size + 32 * protocol.DATA_CHUNK_BYTES, (peak, 4 * x.size)


@pytest.fixture
def parser():
    process = ParserProcess()
    process._connection()
    yield process
    process.close()


def test_the_parser_process_answers_and_refuses(parser):
    import asyncio

    x = np.random.default_rng(4).standard_normal((50, E))
    text = request_text(50, logits_text(x, rows=False))
    got = asyncio.run(parser.parse(text, None, SIGNATURE))
    np.testing.assert_array_equal(got.logits, whole_parse(text))
    with pytest.raises(ProtocolError, match="found str"):
        asyncio.run(parser.parse(request_text(1, '["1"]'), None, SIGNATURE))


def test_a_parser_process_that_died_is_replaced(parser):
    import asyncio

    first, _ = parser._child
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    text = request_text(1, "[" + FLAT + "]")
    assert asyncio.run(parser.parse(text, None, SIGNATURE)).logits.shape == (1, E)
    assert parser._child[0].pid != first.pid
