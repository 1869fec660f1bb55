"""The runtime's work on an ONNX cache hit: tokenizer calls per image, files opened, and the seconds from
`DeLeakerRuntime.from_model` to the first image, for the tiny model saved as a diffusers folder (CPU); then the
CLI's path (`run_job`, one image with ``--compare`` and ``--save-masks``): request resolutions, entity masks made
and tokenizer calls for that image.

    python benchmarks/bench_cache_hit.py [--steps 4] [--text-len 16]

The first runtime fills a fresh cache (its export is not timed); a second runtime on the same folder is measured.
Tokenizer calls are counted on transformers' ``PreTrainedTokenizerBase.__call__`` (CLIP and T5 alike), files with
Python's ``open`` audit event (paths under the model and cache folders). Run it in an older checkout for the
baseline; CPU seconds depend on what else runs on the machine: say so next to them.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="cache-hit loads timed (the median is shown)")
    args = parser.parse_args()

    import transformers

    import deleaker.runtime.text as text_module
    from deleaker.runtime import DeLeakerRuntime, GenerationRequest
    from deleaker.runtime.jobs import RuntimeSpec, run_job, single_job
    from deleaker.tiny import save_tiny_flux

    work = Path(tempfile.mkdtemp(prefix="bench-cache-hit-"))
    folder = save_tiny_flux(work / "model")
    cache = work / "cache"
    request = GenerationRequest(
        "A cat and a dog play in a garden", ("cat", "dog"), seed=1, steps=args.steps, height=64, width=64
    )
    DeLeakerRuntime.from_model(folder, text_len=args.text_len, cache_dir=cache).generate(request)  # fills the cache

    calls: collections.Counter = collections.Counter()
    tokenize = transformers.PreTrainedTokenizerBase.__call__

    def counted(self, *a, **k):
        calls[type(self).__name__] += 1
        return tokenize(self, *a, **k)

    transformers.PreTrainedTokenizerBase.__call__ = counted
    opened: collections.Counter = collections.Counter()
    measuring = [False]

    def audit(event: str, event_args: tuple) -> None:
        if measuring[0] and event == "open" and isinstance(event_args[0], str) and str(work) in event_args[0]:
            opened[event_args[0]] += 1

    sys.addaudithook(audit)
    measuring[0] = True
    start = time.perf_counter()
    runtime = DeLeakerRuntime.from_model(folder, text_len=args.text_len, cache_dir=cache)
    loaded = time.perf_counter()
    calls.clear()  # from_model tokenizes nothing; count the image's calls only
    runtime.generate(request)
    done = time.perf_counter()
    measuring[0] = False

    heavy = {p: n for p, n in opened.items() if p.endswith((".safetensors", ".onnx", ".data"))}
    print(f"tokenizer calls for one image: {dict(sorted(calls.items()))}")
    print(f"from_model -> first image on a cache hit: {done - start:.2f} s (from_model {loaded - start:.2f} s, "
          f"generate {done - loaded:.2f} s)")
    seconds = [done - start]
    for _ in range(args.repeat - 1):  # a new runtime each time: a cache hit with nothing of the last one kept
        tick = time.perf_counter()
        DeLeakerRuntime.from_model(folder, text_len=args.text_len, cache_dir=cache).generate(request)
        seconds.append(time.perf_counter() - tick)
    print(f"from_model -> first image, {len(seconds)} cache hits: median {statistics.median(seconds):.2f} s, "
          f"min {min(seconds):.2f} s")
    print(f"files opened under the model and cache folders: {len(opened)} ({sum(opened.values())} opens); weights "
          "and graphs: " + ", ".join(f"{Path(p).parent.name}/{Path(p).name} x{n}" for p, n in sorted(heavy.items())))

    # The CLI's path: checks, one resolution per request, the image and its plain-FLUX comparison and mask overlay.
    resolve = DeLeakerRuntime.resolve
    make_mask = text_module.entity_token_mask

    def counted_resolve(self, request, *a, **k):
        calls["resolve() calls"] += 1
        resolved = resolve(self, request, *a, **k)
        calls["requests resolved (checked, masked)"] += resolved is not request
        return resolved

    def counted_mask(*a, **k):
        calls["entity masks made"] += 1
        return make_mask(*a, **k)

    DeLeakerRuntime.resolve = counted_resolve
    text_module.entity_token_mask = counted_mask
    fresh = GenerationRequest(
        "A red fox beside a grey owl at night", ("fox", "owl"), seed=2, steps=args.steps, height=64, width=64
    )
    job = single_job(RuntimeSpec(model=str(folder), text_len=args.text_len, cache_dir=cache), fresh,
                     work / "out.png", compare=True, save_masks=True)
    calls.clear()
    run_job(job, runtime=runtime)
    print(f"run_job, one new prompt with --compare --save-masks: {dict(sorted(calls.items()))}")


if __name__ == "__main__":
    main()
