"""Large JSON request bodies parsed in a child process, so that their parse does not hold the server's interpreter.

The body goes down a pipe as raw bytes and the float32 logits come back up it the same way; only a few small
fields are pickled. A process pool would pickle both, and each would be held twice more on its way (the pickle
and its copy on each side): with the pipe, neither process holds much more than the body and its logits. One
body is parsed at a time, the exchanges taking turns on one thread. A child that dies fails the request it was
parsing, and a new one is started for the next.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import signal
from multiprocessing.connection import Connection

import numpy as np

from graphs.serve.protocol import InferRequest, ModelSignature, ProtocolError, parse_request

READY = "ready"
STOP_TIMEOUT_S = 10


class ParserProcess:
    """``await parse(body, header_length, signature)``: ``parse_request`` run in the child process."""

    def __init__(self) -> None:
        # spawn, not fork: the server process has threads (batcher workers) that a fork would copy mid-state.
        self._context = multiprocessing.get_context("spawn")
        self._turns = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusedgate-parser")
        self._child: tuple[multiprocessing.process.BaseProcess, Connection] | None = None

    async def start(self) -> None:
        """Start the child and load the parser in it now, not on the first large request."""
        await asyncio.get_running_loop().run_in_executor(self._turns, self._connection)

    async def parse(self, body: bytes, header_length: str | None, signature: ModelSignature) -> InferRequest:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._turns, self._exchange, body, header_length, signature)

    def close(self) -> None:
        """Wait for the parse in progress, then stop the child (it leaves when its pipe closes)."""
        self._turns.shutdown(wait=True)
        self._stop_child()

    def _connection(self) -> Connection:
        if self._child is not None and self._child[0].is_alive():
            return self._child[1]
        self._stop_child()
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve_parses, args=(theirs,), name="fusedgate-parser", daemon=True)
        process.start()
        theirs.close()
        self._child = process, ours
        if ours.recv() != READY:
            raise RuntimeError("the JSON parser process did not start")
        return ours

    def _stop_child(self) -> None:
        if self._child is None:
            return
        process, connection = self._child
        self._child = None
        connection.close()
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()

    def _exchange(self, body: bytes, header_length: str | None, signature: ModelSignature) -> InferRequest:
        connection = self._connection()
        try:
            connection.send((header_length, signature))
            connection.send_bytes(body)
            answer = connection.recv()
            if isinstance(answer, ProtocolError):
                raise answer
            request_id, outputs, dtype, shape = answer
            logits = np.frombuffer(connection.recv_bytes(), dtype=dtype).reshape(shape)
        except (OSError, EOFError) as broken:
            # The pipe's state is unknown mid-exchange: the next body gets a new child.
            self._stop_child()
            raise RuntimeError(f"the JSON parser process failed: {broken!r}") from None
        return InferRequest(request_id, logits, outputs)


def _serve_parses(connection: Connection) -> None:
    # Ctrl-C reaches the whole process group: the server stops this child by closing the pipe, after the parse in
    # progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection.send(READY)
    while True:
        try:
            header_length, signature = connection.recv()
        except EOFError:
            return
        _answer(connection, header_length, signature)


def _answer(connection: Connection, header_length: str | None, signature: ModelSignature) -> None:
    """One exchange, in a call of its own: the body and logits are gone before the next body arrives."""
    body = connection.recv_bytes()
    try:
        request = parse_request(body, header_length, signature)
    except ProtocolError as error:
        connection.send(error)
        return
    del body
    logits = np.ascontiguousarray(request.logits)
    connection.send((request.id, request.outputs, logits.dtype, logits.shape))
    connection.send_bytes(logits)
