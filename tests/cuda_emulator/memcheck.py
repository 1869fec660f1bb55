"""The emulated kernels under valgrind's memcheck: no read or write outside what was allocated.

    python tests/cuda_emulator/memcheck.py        # about 2 minutes on two cores; needs valgrind

Runs a few launches (B = 1 and 2, head dims 64 and 128, fp16 and bf16, Python-int and tensor steps, inside and
outside the windows, with image-image cuts and rows through the fallback) in a child process under memcheck, then
reads memcheck's log and fails if any error record has a frame in the emulated kernel library. Python's and the
dynamic loader's own memcheck noise is left out that way. Every tensor the kernels touch is its own allocation,
so a read past one lands in memcheck's red zone (the workspace is one allocation: a read past one of its parts
into the next is not seen). Not part of CI (too slow); run it after changing the kernels' indexing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CASES = [
    # (batch, heads, T, grid, head_dim, entities, E_max), dtype name
    ((1, 2, 77, (16, 16), 64, 3, 4), "float16"),
    ((2, 1, 40, (12, 11), 128, 3, 4), "bfloat16"),
]


def run_cases() -> None:
    import math

    import torch

    sys.path.insert(0, str(TESTS))
    import cuda_emulator
    from deleaker.decomposed import plain_attention_with_lse
    from deleaker.plugins import torch_op
    from kernel_checks import CONFIG, INSIDE, structured_inputs

    library = cuda_emulator.EmulatedLibrary(cuda_emulator.build_emulated_library())
    library.init()
    for shape, dtype_name in CASES:
        batch, heads, text_len, grid, head_dim, entities, e_max = shape
        (q, k, v), entity_mask = structured_inputs(
            batch, heads, text_len, grid, head_dim, entities, e_max, getattr(torch, dtype_name), 3, device="cpu"
        )
        q, k, v = (x.clone() for x in (q, k, v))  # one allocation each
        # fallback_threshold 1: the fallback kernel runs on most edited rows too.
        for step, threshold in ((INSIDE, 0.5), (torch.tensor(INSIDE), 1.0), (0, 0.5)):
            plain, lse = plain_attention_with_lse(q, k, v, 1.0 / math.sqrt(head_dim))
            _, _, views = torch_op.launch_kernels(
                library, q, k, v, entity_mask, out=plain, lse=lse, grid=grid, block_step=step, history=None,
                config=CONFIG, stream=0, debug=True, fallback_threshold=threshold,
            )
            print(f"ran {shape} {dtype_name} step {int(step)}: {int(views['union_count'].sum())} rows in U, "
                  f"{int(views['fallback'].sum())} recomputed", flush=True)


def kernel_errors(log: str) -> list[str]:
    """memcheck's error records (blank-line separated) with a frame in the emulated library."""
    records = re.split(r"\n==\d+== \n", log)
    ours = re.compile(r"deleaker::|emu::|nvcuda::|libdeleaker_emulated|\.cuh:|emu_runtime\.cpp|deleaker_attention\.cpp")
    return [r for r in records if re.search(r"Invalid|uninitialised|overlap", r) and ours.search(r)]


def main() -> int:
    if sys.argv[1:] == ["--child"]:
        run_cases()
        return 0
    if shutil.which("valgrind") is None:
        print("memcheck.py needs valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "memcheck.log"
        command = [
            "valgrind", "--tool=memcheck", "--max-stackframe=4000000", f"--log-file={log_path}",
            sys.executable, __file__, "--child",
        ]
        child = subprocess.run(command, env={**os.environ, "PYTHONMALLOC": "malloc"})
        log = log_path.read_text()
    errors = kernel_errors(log)
    for record in errors:
        print(record, file=sys.stderr)
    if child.returncode != 0:
        print(f"the child failed (exit {child.returncode})", file=sys.stderr)
        return 1
    print(f"memcheck: {len(errors)} errors in the emulated kernels")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
