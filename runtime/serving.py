"""Ray Serve deployment of `DeLeakerRuntime`: ``serve.run(app(model="tiny"))`` on a local Ray or a cluster.

HTTP API (see `deleaker.runtime.serving_api` for the body):

- ``POST /generate``: ``image/png`` with the provenance record (the same pixels and record as ``deleaker-trt run``
  for the same request), or with ``Accept: application/json`` a JSON object with the PNG in base64, the record, the
  timings and the size of the batch it ran in (also the ``X-DeLeaker-Batch-Size`` header of a PNG reply).
  400 ``{"error": <the CLI's message>}`` for a bad request; 500 ``{"error": "<type>: <message>"}`` when generation
  fails; 503 when the replicas' queues are full (Ray Serve's back-pressure: ``max_ongoing_requests`` per replica,
  ``max_queued_requests`` waiting, then refused instead of an ever-growing queue).
- ``GET /healthz``: 200 ``{"status": "ready"}`` once the replica is warm (runtime loaded, one step run at the
  default size: the ONNX export or engine load is done), 503 ``{"status": "warming up"}`` before, 500 when the
  warm-up failed (Ray's health check then replaces the replica). A replica loads on a thread, so it answers at
  once; a ``/generate`` that reaches it before it is warm waits for the warm-up.

Concurrent requests are batched with ``@serve.batch`` and run by `DeLeakerRuntime.generate_batch`, one batch per
resolution and step count; a batch that fails is retried one request at a time, so one request's failure is its
own. A replica asks Ray for a GPU when its runtime runs on one; the replica count is fixed or autoscaled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deleaker.errors import ConfigError, DeLeakerError

from .images import png_bytes
from .jobs import RuntimeSpec, output_record
from .request import GenerationRequest
from .serving_settings import ServeSettings, needs_gpu
from .serving_api import (
    error_body,
    generation_error_message,
    json_reply,
    parse_generate_body,
    wants_json,
)

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - the [serve] extra is optional
    raise ImportError(f"serving needs the [serve] extra: pip install 'deleaker-trt[serve]' ({exc})") from exc

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import DeLeakerRuntime

logger = logging.getLogger(__name__)

#: The warm-up request: one step at the runtime's default size (loads the backend, exports once if needed).
WARMUP_PROMPT, WARMUP_ENTITIES = "a cat and a dog", ("cat", "dog")
BATCH_HEADER = "X-DeLeaker-Batch-Size"


class DeLeakerServer:
    """One replica: a warm `DeLeakerRuntime` behind the HTTP API (see the module docstring)."""

    def __init__(self, spec: RuntimeSpec, max_batch_size: int, batch_wait_s: float) -> None:
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        self.runtime: Optional[DeLeakerRuntime] = None
        self.warmup_error: Optional[str] = None
        self._warm = threading.Event()
        # Loading and warming take seconds to minutes (an ONNX export): on a thread, so that the replica answers
        # /healthz with 503 meanwhile instead of the proxy holding every request until the constructor returns.
        threading.Thread(target=self._warm_up, args=(spec,), name="deleaker-warm-up", daemon=True).start()

    def _warm_up(self, spec: RuntimeSpec) -> None:
        try:
            runtime = spec.open()
            height, width = runtime.default_size
            warm = GenerationRequest(WARMUP_PROMPT, WARMUP_ENTITIES, steps=1, height=height, width=width)
            seconds = runtime.generate(warm).timings["total"]
        except BaseException as exc:  # noqa: BLE001 - reported by /healthz and check_health (Ray replaces us)
            self.warmup_error = generation_error_message(exc)
            logger.error("warm-up failed: %s", self.warmup_error)
            return
        self.runtime = runtime
        self._warm.set()
        logger.info("replica warm: %s, warm-up step %.1f s", runtime.backend_name, seconds)

    async def __call__(self, http: Request) -> Response:
        path = http.url.path.rstrip("/") or "/"
        if path.endswith("/healthz"):
            if http.method not in ("GET", "HEAD"):
                return _error(405, f"{path} answers GET")
            if self.warmup_error is not None:
                return _error(500, f"warm-up failed: {self.warmup_error}")
            if not self._warm.is_set():
                return Response(b'{"status": "warming up"}', status_code=503, media_type="application/json")
            return Response(b'{"status": "ready"}', status_code=200, media_type="application/json")
        if not path.endswith("/generate"):
            return _error(404, f"no endpoint {path}; use POST /generate or GET /healthz")
        if http.method != "POST":
            return _error(405, f"{path} answers POST with a JSON body")
        try:
            request = parse_generate_body(await http.body())
        except DeLeakerError as exc:
            return _error(400, str(exc))
        # A request that reaches a replica still warming up waits for it (bounded by the proxy's request timeout;
        # the queue bounds still answer 503 under overload).
        while not self._warm.is_set():
            if self.warmup_error is not None:
                return _error(503, f"this replica failed to warm up: {self.warmup_error}")
            await asyncio.sleep(0.1)
        outcome = await self._batched(request)
        if isinstance(outcome, _Refused):
            return _error(400, outcome.message)
        if isinstance(outcome, BaseException):
            return _error(500, generation_error_message(outcome))
        result, batch_size = outcome
        record = output_record(self.runtime, result.request)
        png = png_bytes(result.image, record)
        headers = {BATCH_HEADER: str(batch_size)}
        if wants_json(http.headers.get("accept", "")):
            return Response(json_reply(png, result, record, batch_size), media_type="application/json",
                            headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose warm-up failed is unhealthy (Ray replaces it)."""
        if self.warmup_error is not None:
            raise RuntimeError(f"warm-up failed: {self.warmup_error}")

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, requests: list[GenerationRequest]) -> list[Any]:
        # The runtime is not async: run the batch on a worker thread so the replica keeps taking requests.
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, requests: list[GenerationRequest]) -> list[Any]:
        """Per request: ``(result, batch size)``, `_Refused` (a request the model refuses: 400) or the exception
        its generation raised (500). Only this worker thread uses the runtime (one batch at a time per replica)."""
        outcomes: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, int, int], list[tuple[int, GenerationRequest]]] = {}
        for index, request in enumerate(requests):
            try:
                resolved = self.runtime.resolve(request)
            except DeLeakerError as exc:
                outcomes[index] = _Refused(str(exc))
                continue
            groups.setdefault((resolved.height, resolved.width, resolved.steps), []).append((index, resolved))
        for members in groups.values():
            try:
                results = self.runtime.generate_batch([request for _, request in members])
            except Exception as exc:  # noqa: BLE001 - a failed batch is retried per request, each keeps its error
                if len(members) == 1:
                    outcomes[members[0][0]] = exc
                    continue
                logger.warning("a batch of %d failed (%s); running its requests one by one", len(members), exc)
                for index, request in members:
                    try:
                        outcomes[index] = (self.runtime.generate(request), 1)
                    except Exception as single:  # noqa: BLE001 - answered as a 500 naming its type
                        outcomes[index] = single
                continue
            for (index, _), result in zip(members, results):
                outcomes[index] = (result, len(members))
        return outcomes


@dataclass(frozen=True)
class _Refused:
    """A request the model refuses (too many T5 tokens, an entity without tokens, a resolution it cannot run)."""

    message: str


def _error(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json")


def app(
    model: Optional[str] = None,
    *,
    engines: Optional[str | Path] = None,
    settings: ServeSettings = ServeSettings(),
    **runtime_options: Any,
) -> "serve.Application":
    """The bound Ray Serve application serving ``model`` (``"tiny"`` or a diffusers folder) or ``engines`` (an
    engine directory): ``serve.run(app(model="tiny"))``. ``runtime_options``: the other fields of `RuntimeSpec`
    (backend, text_len, max_entities, cache_dir, device, deleaker_overrides, precision), checked here, before
    Ray starts anything. Paths must be readable on every node that runs a replica.
    """
    allowed = {f.name for f in fields(RuntimeSpec)} - {"model", "engines"}
    unknown = sorted(set(runtime_options) - allowed)
    if unknown:
        raise ConfigError(f"unknown runtime option(s) {unknown}; allowed: {sorted(allowed)}")
    if not isinstance(settings, ServeSettings):
        raise ConfigError(f"settings must be a ServeSettings, got {type(settings).__name__}")
    spec = RuntimeSpec(model=model, engines=None if engines is None else Path(engines), **runtime_options)
    return app_for_spec(spec, settings)


def app_for_spec(spec: RuntimeSpec, settings: ServeSettings = ServeSettings()) -> "serve.Application":
    """`app` for a `RuntimeSpec` already made (the CLI's); a FLUX.2 model is refused (`RuntimeSpec.refuse_flux2`)."""
    spec.refuse_flux2("serve")
    gpus = settings.num_gpus if settings.num_gpus is not None else (1.0 if needs_gpu(spec) else 0.0)
    options: dict[str, Any] = {
        "name": "deleaker",
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": gpus},
        "health_check_period_s": 10.0,
        # Loading a model and exporting its ONNX on first use takes minutes on a CPU: not a failed health check.
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": 30.0,
    }
    if settings.autoscale is not None:
        low, high = settings.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": settings.max_batch_size,
        }
    else:
        options["num_replicas"] = settings.replicas
    deployment = serve.deployment(**options)(DeLeakerServer)
    return deployment.bind(spec, settings.max_batch_size, settings.batch_wait_s)
