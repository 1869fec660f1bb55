"""``deleaker-trt serve``: bad options answer before Ray starts (one ``error:`` line, exit 1); the command joins a
simulated two-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node), places its replicas on both
nodes, serves on 127.0.0.1, and stops gracefully on SIGTERM (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from deleaker.runtime.cli import main

ray = pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "0"], "port must be an int in [1, 65535], got 0"),
        (["--port", "http"], "port must be an int in [1, 65535], got 'http'"),
        (["--replicas", "0"], "replicas must be an int in [1, 1024], got 0"),
        (["--max-batch-size", "65"], "max_batch_size must be an int in [1, 64], got 65"),
        (["--max-queued-requests", "0"], "max_queued_requests must be an int in [1, 1048576], got 0"),
        (["--autoscale", "3"], "--autoscale must be MIN,MAX replicas"),
        (["--autoscale", "4,2"], "autoscale must be (min, max) replicas with 1 <= min <= max"),
        (["--autoscale", "1,4", "--replicas", "2"], "give replicas or autoscale, not both"),
        (["--host", "no-such-host.invalid"], "is not an address of this machine"),
    ],
)
def test_bad_options_are_one_error_line_before_ray_starts(args, message):
    started = time.monotonic()
    result = CliRunner().invoke(main, ["serve", "--model", "tiny", *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not ray.is_initialized() and time.monotonic() - started < 30


def test_a_port_in_use_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--model", "tiny", "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_serve_spreads_replicas_over_two_nodes_and_stops_on_sigterm(tmp_path_factory):
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    process = None
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = _free_port()
        cache = tmp_path_factory.getbasetemp() / "deleaker-serve-cache"
        command = [
            sys.executable, "-m", "deleaker.runtime.cli", "serve", "--model", "tiny", "--text-len", "32",
            "--cache-dir", str(cache), "--replicas", "2", "--port", str(port),
        ]
        process = subprocess.Popen(
            command, env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 300
        while _get(f"http://127.0.0.1:{port}/healthz") != 200:
            assert process.poll() is None, process.communicate(timeout=30)
            assert time.monotonic() < deadline, "the server was not ready in 300 s"
            time.sleep(1.0)

        body = json.dumps({"prompt": "A cat and a dog", "entities": ["cat", "dog"], "steps": 2}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body)
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200 and reply.read(8) == b"\x89PNG\r\n\x1a\n"

        replicas = [
            actor for actor in list_actors(filters=[("state", "=", "ALIVE")])
            if actor.class_name.startswith("ServeReplica") and "deleaker" in actor.class_name
        ]
        assert len(replicas) == 2 and len({actor.node_id for actor in replicas}) == 2, replicas

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == "stopped"
        assert _get(f"http://127.0.0.1:{port}/healthz") != 200
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        ray.shutdown()
        cluster.shutdown()
