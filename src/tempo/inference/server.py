"""The HTTP face of confidential inference (``tempo serve``): Starlette, run under uvicorn.

``POST /predict`` takes JSON ``{"inputs": [...]}`` (pixels in [0, 1], nested [batch, C, H, W]) or one
encoded image as the body, and answers ``{"predictions": [{"prediction": k, "probabilities": [...]}]}``.
``GET /health`` says whether the model can answer, ``GET /metrics`` counts requests, latencies, batch
sizes and worker faults. Bodies are untrusted: an oversized one is refused with 413 before it is read
whole, malformed JSON with 400, and inputs that do not fit the model with 422, each with a reason.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import DatasetError, TempoError
from .batching import Batcher
from .inputs import decode_image
from .model import ModelSpec

LATENCIES_KEPT = 10_000  # the percentiles describe the most recent requests


class Refused(Exception):
    """A request the server will not run: its status code and the reason it is told."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Metrics:
    """Request counters and recent latencies (the batcher keeps batch sizes and faults)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests, self.inputs = 0, 0
        self.statuses: Counter[int] = Counter()
        self.latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)

    def record(self, status: int, inputs: int, seconds: float) -> None:
        with self._lock:
            self.requests += 1
            self.statuses[status] += 1
            if status == 200:
                self.inputs += inputs
                self.latencies.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            latencies = torch.tensor(list(self.latencies), dtype=torch.float64)
            percentiles = {} if not len(latencies) else {
                f"p{q}": round(float(latencies.quantile(q / 100)) * 1000, 3) for q in (50, 90, 99)}
            return {"requests": self.requests, "inputs_answered": self.inputs,
                    "responses": {str(k): v for k, v in sorted(self.statuses.items())},
                    "latency_ms": {"count": len(latencies), **percentiles}}


def create_app(batcher: Batcher, spec: ModelSpec, *, max_body_bytes: int, describe: str = "") -> Starlette:
    """The app; `batcher` is started and stopped by whoever runs it (the app stops it on shutdown)."""
    metrics = Metrics()

    async def predict(request: Request) -> JSONResponse:
        start, inputs = time.perf_counter(), 0
        try:
            x = await _inputs(request, spec, batcher.max_batch, max_body_bytes)
            inputs = len(x)
            try:
                probabilities = await asyncio.wrap_future(batcher.submit(x))
            except TempoError as e:  # no worker left to take the products
                raise Refused(503, f"the model cannot answer: {' '.join(str(e).split())[:300]}") from None
            body = {"predictions": [{"prediction": int(p.argmax()), "probabilities": p.tolist()}
                                    for p in probabilities]}
            status = 200
        except Refused as e:
            body, status = {"error": e.reason}, e.status
        metrics.record(status, inputs, time.perf_counter() - start)
        return JSONResponse(body, status_code=status)

    async def health(request: Request) -> JSONResponse:
        workers = batcher.snapshot()["workers"]
        live = sum(w["live"] for w in workers)
        return JSONResponse({"status": "ok" if live else "no worker left", "model": describe or spec.describe(),
                             "live_workers": live, "workers": len(workers)}, status_code=200 if live else 503)

    async def metrics_page(request: Request) -> JSONResponse:
        return JSONResponse({**metrics.snapshot(), **batcher.snapshot(),
                             "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)  # in-flight requests are done

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                             Route("/metrics", metrics_page)], lifespan=lifespan)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _inputs(request: Request, spec: ModelSpec, max_inputs: int, max_body_bytes: int) -> torch.Tensor:
    """The request's inputs, prepared for the model; Refused (4xx) with the reason when they cannot be."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _body(request, max_body_bytes)
    if kind == "application/json":
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Refused(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise Refused(400, "the body nests JSON too deeply") from None
        if not isinstance(document, dict) or "inputs" not in document:
            raise Refused(422, 'expected a JSON object {"inputs": [...]} (a nested list [batch, C, H, W])')
        try:
            pixels = torch.tensor(document["inputs"], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise Refused(422, f'"inputs" is not a nested list of numbers of one shape [batch, C, H, W]: {e}') from None
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != spec.shape:
            raise Refused(422, f'"inputs" has shape {list(pixels.shape)}; the model takes [batch, '
                               f'{", ".join(map(str, spec.shape))}]')
        what = '"inputs"'
    elif kind.startswith("image/") or kind == "application/octet-stream":
        try:
            pixels = decode_image(body, spec.channels, "the body").unsqueeze(0)
        except DatasetError as e:
            raise Refused(422, str(e)) from None
        what = "the image"
    else:
        raise Refused(415, f"content type {kind or 'none'!r}: send application/json {{\"inputs\": [...]}} or an "
                           "image (image/png, image/jpeg, ...)")
    if pixels.dim() == 4 and len(pixels) > max_inputs:
        raise Refused(413, f"{len(pixels)} inputs in one request; at most {max_inputs} (the server's --max-batch)")
    if pixels.dim() == 4 and len(pixels) == 0:
        raise Refused(422, '"inputs" is empty')
    try:
        return spec.prepare(pixels, what=what)
    except DatasetError as e:
        raise Refused(422, str(e)) from None
