"""Ray Serve throughput and latency of ``deleaker.runtime.serving`` on this machine (the tiny model, ONNX Runtime).

For each deployment -- 1 replica with batching, 2 replicas with batching, 1 replica without batching
(``max_batch_size=1``, the baseline of the batching gain) -- and 1, 4 and 16 concurrent clients, every client
sends requests back to back (each its own prompt and seed) until the level has sent ``--requests`` in all;
requests/s is completed requests over the level's wall time, p50/p95 the per-request latency. Each 1-replica
deployment also runs 16 clients on one prompt (seeds differ): a batch then shares one entity mask, which is one
transformer call (requests with different entities run as separate calls in the same loop). Bounded: a fixed
request count per level, a timeout per request, one Ray instance on 127.0.0.1.

    python benchmarks/bench_serving.py [--steps 4] [--requests 48] [--json out.json]

Prints a Markdown table (and writes the figures as JSON with ``--json``). CPU figures depend on what else runs on
the machine: say so next to them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import ray
from ray import serve

from deleaker.runtime.serving import app
from deleaker.runtime.serving_settings import ServeSettings

PROMPTS = (
    ("A cat and a cheetah are splashing each other with water in a shallow river", ["cat", "cheetah"]),
    ("A red dog chases a small bird across a snowy field", ["dog", "bird"]),
    ("A horse and a cow stand in a green meadow", ["horse", "cow"]),
    ("An owl watches a fox from an old oak tree", ["owl", "fox"]),
)
DEPLOYMENTS = (("1 replica, batch <= 4", 1, 4), ("2 replicas, batch <= 4", 2, 4), ("1 replica, no batching", 1, 1))
CLIENTS = (1, 4, 16)
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _one(url: str, index: int, steps: int, shared: bool) -> tuple[float, int]:
    prompt, entities = PROMPTS[0 if shared else index % len(PROMPTS)]
    body = json.dumps({"prompt": prompt, "entities": entities, "seed": index, "steps": steps}).encode()
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=TIMEOUT_S) as reply:
        reply.read()
        batch = int(reply.headers.get("X-DeLeaker-Batch-Size", "1"))
    return time.perf_counter() - started, batch


def _level(url: str, clients: int, requests: int, steps: int, shared: bool = False) -> dict:
    latencies: list[float] = []
    batches: list[int] = []
    counter = iter(range(requests))

    def client() -> None:
        for index in counter:  # a shared iterator: the level sends exactly `requests`
            seconds, batch = _one(url, index, steps, shared)
            latencies.append(seconds)
            batches.append(batch)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result(timeout=TIMEOUT_S * requests)
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "prompts": "one prompt (shared entity mask)" if shared else "4 prompts",
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))],
        "mean_batch": sum(batches) / len(batches),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48, help="requests per level (clients count)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cache = Path(os.environ.get("DELEAKER_CACHE") or tempfile.mkdtemp(prefix="deleaker-bench-serving-"))
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": TIMEOUT_S})
        for label, replicas, batch in DEPLOYMENTS:
            settings = ServeSettings(replicas=replicas, max_batch_size=batch, batch_wait_s=0.02,
                                     max_ongoing_requests=max(8, 2 * batch), max_queued_requests=256, num_cpus=1)
            serve.run(app(model="tiny", text_len=32, cache_dir=cache, settings=settings), name="bench",
                      route_prefix="/")
            url = f"http://127.0.0.1:{port}/generate"
            _level(url, 2, 4, args.steps)  # warm the HTTP path and every replica's first request
            for clients in CLIENTS:
                row = {"deployment": label, "replicas": replicas, "max_batch_size": batch,
                       **_level(url, clients, max(args.requests, clients), args.steps)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            if replicas == 1:  # the batching gain where the batch shares one entity mask (one transformer call)
                row = {"deployment": label, "replicas": replicas, "max_batch_size": batch,
                       **_level(url, CLIENTS[-1], max(args.requests, CLIENTS[-1]), args.steps, shared=True)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    print(f"tiny model, 64x64, {args.steps} steps, T = 32, ONNX Runtime on the CPU; {machine}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| deployment | prompts | clients | requests/s | p50 latency | p95 latency | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['deployment']} | {row['prompts']} | {row['clients']} | {row['requests_per_s']:.2f} "
              f"| {row['p50_s'] * 1000:.0f} ms | {row['p95_s'] * 1000:.0f} ms | {row['mean_batch']:.2f} |")
    by = {(r["deployment"], r["prompts"], r["clients"]): r["requests_per_s"] for r in rows}
    print()
    for prompts, clients in [(p, c) for p in ("4 prompts",) for c in CLIENTS] + [(rows[-1]["prompts"], CLIENTS[-1])]:
        gain = by[(DEPLOYMENTS[0][0], prompts, clients)] / by[(DEPLOYMENTS[2][0], prompts, clients)]
        print(f"batching gain, {prompts}, {clients} clients (1 replica, batch <= 4 vs no batching): {gain:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
