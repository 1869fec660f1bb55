"""The runtime's work on an ONNX cache hit: tokenizer calls per image, files opened, and the seconds from
`DeLeakerRuntime.from_model` to the first image, for the tiny model saved as a diffusers folder (CPU).

    python benchmarks/bench_cache_hit.py [--steps 4] [--text-len 16]

The first runtime fills a fresh cache (its export is not timed); a second runtime on the same folder is measured.
Tokenizer calls are counted on transformers' ``PreTrainedTokenizerBase.__call__`` (CLIP and T5 alike), files with
Python's ``open`` audit event (paths under the model and cache folders). Run it in an older checkout for the
baseline; CPU seconds depend on what else runs on the machine: say so next to them.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=16)
    args = parser.parse_args()

    import transformers

    from deleaker.runtime import DeLeakerRuntime, GenerationRequest
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
    print(f"files opened under the model and cache folders: {len(opened)} ({sum(opened.values())} opens); weights "
          "and graphs: " + ", ".join(f"{Path(p).parent.name}/{Path(p).name} x{n}" for p, n in sorted(heavy.items())))


if __name__ == "__main__":
    main()
