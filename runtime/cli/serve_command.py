"""``deleaker-trt serve``: check the options, start Ray Serve with `deleaker.runtime.serving.app` on HOST:PORT, block
until Ctrl-C or SIGTERM, then shut the deployment and Ray down (in-flight requests finish first, up to Ray's
graceful-shutdown timeout) and exit 0.

Mounted on the ``deleaker-trt`` group by ``deleaker.runtime.cli``. Bad options answer before Ray starts: one
``error:`` line, exit 1 (usage errors exit 2). A deployment that cannot start (a replica's model fails to load) is
one ``error:`` line and exit 1 after Ray is shut down. With ``RAY_ADDRESS`` set, the command joins that cluster.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import click

from deleaker.errors import ConfigError, DeLeakerError

from .options import runtime_spec, source_options
from .errors import CHECKED_INT, DeLeakerCliError, reported_errors


class _Stop(BaseException):
    """SIGTERM while serving: unwinds like Ctrl-C into the graceful shutdown."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def check_listen_address(host: Any, port: Any) -> None:
    """Raise `ConfigError` unless ``port`` is an int in [1, 65535] and ``host:port`` can be listened on now."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be an int in [1, 65535], got {port!r:.40}")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"host must be an address to listen on (e.g. 127.0.0.1, 0.0.0.0), got {host!r:.80}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"host {host!r:.80} is not an address of this machine ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _wait_until_warm(host: str, port: int) -> None:
    """Poll ``/healthz`` until a replica answers 200; raise `ConfigError` with its message when the warm-up failed
    (a model that cannot load). Ctrl-C and SIGTERM interrupt the wait."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{probe}:{port}/healthz" if ":" not in probe else f"http://[{probe}]:{port}/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                if reply.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 500:
                try:
                    message = json.loads(exc.read()).get("error", "")
                except ValueError:
                    message = ""
                raise ConfigError(f"the deployment cannot start: {message or 'its warm-up failed'}") from None
        except OSError:  # not listening yet, or the proxy still routing: ask again
            pass
        time.sleep(1.0)


def _autoscale(value: Optional[str]) -> Optional[tuple[Any, Any]]:
    # "MIN,MAX"; the numbers are checked by ServeSettings (one message with the allowed range).
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2:
        raise ConfigError(f"--autoscale must be MIN,MAX replicas (e.g. 1,4), got {value!r:.40}")
    return tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts)  # type: ignore[return-value]


@click.command("serve")
@source_options
@click.option("--replicas", type=CHECKED_INT, default=1, show_default=True, help="Replicas (Ray actors), 1 or more.")
@click.option("--autoscale", default=None, metavar="MIN,MAX", help="Autoscale between MIN and MAX replicas instead.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", type=CHECKED_INT, default=8000, show_default=True, help="Port of the HTTP proxy.")
@click.option(
    "--max-batch-size", type=CHECKED_INT, default=4, show_default=True, help="Requests batched together, 1 to 64."
)
@click.option(
    "--max-queued-requests",
    type=CHECKED_INT,
    default=16,
    show_default=True,
    help="Requests waiting for a replica; more are answered 503.",
)
def serve(
    engines, model, backend, text_len, max_entities, cache_dir, device, precision, loras, overrides,
    replicas, autoscale, host, port, max_batch_size, max_queued_requests,
) -> None:
    """Serve DeLeaker over HTTP with Ray Serve (POST /generate, GET /healthz) until Ctrl-C or SIGTERM."""
    with reported_errors("the server"):
        spec = runtime_spec(
            engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides, loras=loras
        )
        spec.refuse_flux2("serve")  # before Ray starts
        from deleaker.runtime.serving_settings import ServeSettings

        settings = ServeSettings(
            replicas=replicas,
            autoscale=_autoscale(autoscale),
            max_batch_size=max_batch_size,
            max_ongoing_requests=max(2 * max_batch_size, 8) if isinstance(max_batch_size, int) else max_batch_size,
            max_queued_requests=max_queued_requests,
        )
        check_listen_address(host, port)
        try:
            import ray
            from ray import serve as ray_serve

            from deleaker.runtime.serving import app_for_spec
        except ImportError as exc:
            raise ConfigError(f"serve needs the [serve] extra: pip install 'deleaker-trt[serve]' ({exc})") from None

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    failure: Optional[str] = None
    try:
        click.echo("starting Ray Serve (the first start exports or loads the model: minutes on a CPU) ...", err=True)
        ray.init(include_dashboard=False, log_to_driver=False)
        # Ray's core worker installs its own SIGTERM handler (it aborts the process): ours again, so that SIGTERM
        # shuts the deployment down.
        signal.signal(signal.SIGTERM, _raise_stop)
        # One HTTP proxy, on the head node (this machine): HOST:PORT is where the command says it serves.
        ray_serve.start(
            proxy_location="HeadOnly",
            http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s},
        )
        ray_serve.run(app_for_spec(spec, settings), route_prefix="/", blocking=False)
        click.echo(f"listening on http://{host}:{port} (POST /generate, GET /healthz); warming up ...", err=True)
        _wait_until_warm(host, port)
        click.echo(f"ready: serving on http://{host}:{port}; Ctrl-C stops", err=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        click.echo("stopping: in-flight requests finish, then the replicas and Ray shut down ...", err=True)
    except DeLeakerError as exc:
        failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - Ray's own errors (a replica that fails to start): one line, exit 1
        failure = f"the deployment failed: {type(exc).__name__}: {str(exc)[:1000]}"
    finally:
        # A second signal must not interrupt the shutdown half way (replicas left running).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                ray_serve.shutdown()
                ray.shutdown()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        raise DeLeakerCliError(failure)
    click.echo("stopped", err=True)
