"""The bare endpoint: FastAPI's minimal POST handler (await the body, answer a constant), the framework's ceiling
that the capacity run measures the service against. ``python -m graphs.serve.bare --port P`` serves it with the
same uvicorn configuration, event loop and HTTP parser as ``fusedgate serve``."""

from __future__ import annotations

import argparse
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from graphs.serve.server import uvicorn_server

ANSWER = {"model_name": "bare", "outputs": []}


def create_bare_app() -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(ANSWER)

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn_server(create_bare_app(), args.host, args.port).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
