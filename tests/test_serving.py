"""``deleaker.runtime.serving`` on a real Ray Serve (one local Ray for this module, HTTP on 127.0.0.1): the tiny
model on ONNX Runtime, concurrent clients get the images `DeLeakerRuntime` makes, requests are batched, bad input
answers 400 with the CLI's message, a full queue 503, and a killed replica is replaced without a client hanging.

Every client call has a timeout and every loop a bound in count and time.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from deleaker.runtime.cli import main  # noqa: E402
from deleaker.runtime.images import RECORD_KEY  # noqa: E402
from deleaker.runtime.jobs import RuntimeSpec, output_record  # noqa: E402
from deleaker.runtime.request import GenerationRequest  # noqa: E402
from deleaker.runtime.serving import app  # noqa: E402
from deleaker.runtime.serving_settings import ServeSettings  # noqa: E402

TEXT_LEN = 32
STEPS = 2
#: Seconds a client waits for one reply before the test fails (a generation of the tiny model takes well under 1 s).
CLIENT_TIMEOUT = 60
PROMPTS = (
    ("A cat and a cheetah are splashing each other with water in a shallow river", ["cat", "cheetah"]),
    ("A red dog chases a small bird across a snowy field", ["dog", "bird"]),
    ("A horse and a cow stand in a green meadow", ["horse", "cow"]),
    ("An owl watches a fox from an old oak tree", ["owl", "fox"]),
)


#: What /healthz answered while the main app warmed up, in order (one entry per change).
WARMING: list[int] = []


def _wait_ready(url: str, limit_s: float = 300) -> list[int]:
    """Poll ``url`` until 200 (at most ``limit_s``); the statuses seen, one per change."""
    seen: list[int] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = _get(url)[0]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {limit_s} s: {seen}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "deleaker-serve-cache"


@pytest.fixture(scope="module")
def server(cache_dir):
    """One Ray, one Serve on 127.0.0.1: the main app (2 replicas) at /, a one-slot app at /small for overload."""
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        settings = ServeSettings(replicas=2, max_batch_size=4, batch_wait_s=0.2, max_ongoing_requests=8,
                                 max_queued_requests=64, num_cpus=1)
        serve.run(app(model="tiny", text_len=TEXT_LEN, cache_dir=cache_dir, settings=settings), name="default",
                  route_prefix="/")
        # serve.run returns once the replicas are up; they warm up (export, load, one step) on a thread.
        WARMING[:] = _wait_ready(f"http://127.0.0.1:{port}/healthz")
        small = ServeSettings(replicas=1, max_batch_size=1, batch_wait_s=0.0, max_ongoing_requests=1,
                              max_queued_requests=1, num_cpus=1)
        serve.run(app(model="tiny", text_len=TEXT_LEN, cache_dir=cache_dir, settings=small), name="small",
                  route_prefix="/small")
        _wait_ready(f"http://127.0.0.1:{port}/small/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def runtime(cache_dir):
    """The same model in this process: what every served image must equal."""
    return RuntimeSpec(model="tiny", text_len=TEXT_LEN, cache_dir=cache_dir).open()


def _post(url: str, body: bytes | dict, *, accept: str = "image/png", timeout: float = CLIENT_TIMEOUT):
    """``(status, headers, body bytes)``; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Accept": accept, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, _lower(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers), exc.read()


def _lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _get(url: str, timeout: float = 10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:  # the proxy not listening yet, or a timeout
        return type(exc).__name__, b""


def _body(index: int) -> dict:
    prompt, entities = PROMPTS[index % len(PROMPTS)]
    return {"prompt": prompt, "entities": entities, "seed": 100 + index, "steps": STEPS, "guidance": 2.0 + index % 3}


def _request(body: dict) -> GenerationRequest:
    return GenerationRequest(body["prompt"], body["entities"], body.get("seed", 0), body["steps"], body["guidance"])


def test_healthz_is_503_while_warming_up_then_200(server):
    # The replicas answered at once (no proxy timeout) and said 503 until their warm-up was done.
    assert WARMING[-2:] == [503, 200], WARMING
    status, body = _get(f"{server}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ready"}


def test_concurrent_clients_get_the_runtime_images_in_batches(server, runtime):
    # 8 clients send 32 requests at once (4 each); half ask for JSON, half for the PNG.
    bodies = [_body(i) for i in range(32)]

    def client(first: int) -> list[tuple[int, int, dict, bytes]]:
        replies = []
        for index in range(first, 32, 8):
            accept = "application/json" if index % 2 else "image/png"
            replies.append((index, *_post(f"{server}/generate", bodies[index], accept=accept)))
        return replies

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = [r for future in [pool.submit(client, c) for c in range(8)] for r in future.result(timeout=600)]
    elapsed = time.monotonic() - started
    assert len(replies) == 32
    batch_sizes = []
    for index, status, headers, payload in replies:
        assert status == 200, payload[:300]
        if index % 2:
            reply = json.loads(payload)
            png = base64.b64decode(reply["image_png_base64"])
            assert set(reply["timings"]) >= {"encode", "denoise", "decode", "total"}
            assert reply["batch_size"] == int(headers["x-deleaker-batch-size"])
        else:
            assert headers["content-type"] == "image/png"
            png = payload
        batch_sizes.append(int(headers["x-deleaker-batch-size"]))
        served = Image.open(io.BytesIO(png))
        served.load()
        request = _request(bodies[index])
        alone = runtime.generate(request)
        # The provenance record is the CLI's (`run` writes the same one into its PNG).
        assert json.loads(served.text[RECORD_KEY]) == json.loads(json.dumps(output_record(runtime, alone.request)))
        # The same pixels as DeLeakerRuntime, up to one 8-bit level where a batched matrix product rounds
        # differently from a single row's.
        difference = np.abs(np.asarray(served).astype(int) - np.asarray(alone.image).astype(int))
        assert difference.max() <= 1, (index, difference.max())
    assert max(batch_sizes) > 1, batch_sizes
    print(f"32 requests from 8 clients in {elapsed:.1f} s; batch sizes {sorted(batch_sizes)}")


def _cli_error(*args: str) -> str:
    """The ``error:`` line `deleaker-trt run` prints for these options (tiny model, nothing generated)."""
    result = CliRunner().invoke(main, ["run", "--model", "tiny", "--text-len", str(TEXT_LEN), *args])
    assert result.exit_code == 1, result.output
    line = [line for line in result.output.splitlines() if line.startswith("error: ")][-1]
    return line.removeprefix("error: ")


GOOD = {"prompt": "A cat and a dog", "entities": ["cat", "dog"]}
#: Each bad input of the README's "Input checks" that a request carries, as a body and as `run` options.
BAD_INPUTS = [
    ({"prompt": ""}, ["--prompt", ""]),
    ({"prompt": "a cat and a dog " + "x" * 20_000}, ["--prompt", "a cat and a dog " + "x" * 20_000]),
    ({"prompt": "a cat and a dog" + " very" * 40}, ["--prompt", "a cat and a dog" + " very" * 40]),
    ({"entities": ["cat"]}, ["--entities", "cat"]),
    ({"entities": ["cat", "lion"]}, ["--entities", "cat,lion"]),
    ({"entities": ["cat", "Cat"]}, ["--entities", "cat,Cat"]),
    ({"entities": ["cat", "dog", "!!"]}, ["--entities", "cat,dog,!!"]),
    ({"prompt": "a cat, a dog, an owl, a fox and a cow", "entities": ["cat", "dog", "owl", "fox", "cow"]},
     ["--prompt", "a cat, a dog, an owl, a fox and a cow", "--entities", "cat,dog,owl,fox,cow"]),
    ({"seed": 2**63}, ["--seed", str(2**63)]),
    ({"steps": 0}, ["--steps", "0"]),
    ({"steps": 1001}, ["--steps", "1001"]),
    ({"guidance": -1.0}, ["--guidance", "-1"]),
    ({"guidance": 101.0}, ["--guidance", "101"]),
    ({"height": 60}, ["--height", "60"]),
    ({"height": 4096}, ["--height", "4096"]),
    ({"width": 0}, ["--width", "0"]),
    ({"height": 64, "width": 36}, ["--height", "64", "--width", "36"]),
]


@pytest.mark.parametrize("change,options", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_answers_400_with_the_cli_message(server, tmp_path, change, options):
    body = {**GOOD, "steps": 1, **change}
    status, headers, payload = _post(f"{server}/generate", body)
    assert status == 400 and headers["content-type"] == "application/json", payload[:300]
    cli_args = ["--prompt", body["prompt"], "--entities", ",".join(body["entities"]), "--steps", "1", *options]
    assert json.loads(payload) == {"error": _cli_error(*cli_args, "--out", str(tmp_path / "x.png"))}
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "payload,message",
    [
        (b'{"prompt": "A cat and a dog", "entities": ["cat", "dog"], "seed": 1, "seed": 2}', "duplicate key 'seed'"),
        (b'{"prompt": "A cat and a dog", "entities": ["cat", "dog"], "guidance": NaN}', "NaN is not JSON"),
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"", "empty"),
        (b'{"prompt": "A cat and a dog", "entities": "cat,dog"}', "'entities' must be a list of strings"),
        (b'{"prompt": "A cat and a dog", "entities": ["cat", "dog"], "seed": -1}', "'seed' must be a non-negative"),
        (b'{"prompt": "A cat and a dog", "entities": ["cat", "dog"], "steps": true}', "steps must be an int"),
        (b'{"prompt": "A cat and a dog", "entities": ["cat", "dog"], "text_len": 64}', "unknown key(s) ['text_len']"),
        (b'{"prompt": "A cat and a dog \\ud800", "entities": ["cat", "dog"]}', "prompt"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_body_answers_400(server, payload, message):
    status, headers, reply = _post(f"{server}/generate", payload)
    assert status == 400 and headers["content-type"] == "application/json"
    assert message in json.loads(reply)["error"]


def test_wrong_routes_and_methods(server):
    assert _get(f"{server}/generate")[0] == 405
    assert _get(f"{server}/nothing-here")[0] == 404
    assert _post(f"{server}/healthz", GOOD)[0] == 405


def test_a_full_queue_answers_503(server):
    # The /small app holds one request and queues one: of 8 at once, some are refused, none waits forever.
    body = {**GOOD, "steps": 40}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, f"{server}/small/generate", {**body, "seed": i}) for i in range(8)]
        statuses = [f.result(timeout=CLIENT_TIMEOUT + 10)[0] for f in futures]
    assert 503 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 503}
    assert _post(f"{server}/small/generate", {**GOOD, "steps": 1})[0] == 200  # answers again once drained


def test_a_killed_replica_is_replaced_and_no_client_hangs(server):
    replicas = [
        actor for actor in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in actor["name"] and "deleaker" in actor["name"] and "small" not in actor["name"]
    ]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    outcomes: list[object] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for round_ in range(3):
            started = time.monotonic()
            try:
                status = _post(f"{server}/generate", {**_body(index), "seed": index * 10 + round_})[0]
            except OSError as exc:  # the connection dropped: an error, not a hang
                status = type(exc).__name__
            with lock:
                outcomes.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    ray.kill(victim, no_restart=True)
    for thread in threads:
        thread.join(timeout=3 * CLIENT_TIMEOUT + 10)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert len(outcomes) == 18 and all(seconds <= CLIENT_TIMEOUT + 5 for _, seconds in outcomes), outcomes
    assert any(status == 200 for status, _ in outcomes)
    # Ray starts a new replica (warm from the export cache); later requests succeed on both.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = serve.status().applications["default"].deployments["deleaker"].status
        running = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "SERVE_REPLICA" in a["name"] and "deleaker" in a["name"] and "small" not in a["name"]]
        replaced = replicas[0]["name"] not in {a["name"] for a in running}
        if str(status).endswith("HEALTHY") and len(running) == 2 and replaced:
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"the deployment did not recover in 180 s: {serve.status().applications['default']}")
    statuses = [_post(f"{server}/generate", {**_body(i), "seed": 900 + i})[0] for i in range(4)]
    assert statuses == [200] * 4
