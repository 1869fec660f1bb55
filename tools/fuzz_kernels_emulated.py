"""Fuzz the emulated CUDA kernels on awkward shapes against the decomposed op and the float64 slow reference.

    python tools/fuzz_kernels_emulated.py [--cases N] [--seed S] [--only INDEX] [--slow-ref]
    python tools/fuzz_kernels_emulated.py --sweep [--seed S] [--slow-ref] [--defines DELEAKER_BAND_ROWS=64]
    python tools/fuzz_kernels_emulated.py --edges [--slow-ref]     # the small edge cases, checked
    python tools/fuzz_kernels_emulated.py --memcheck               # the same under valgrind (a few minutes)

Not collected by pytest (no ``test_`` prefix). Each case draws a shape (T, grid, B, H, D, E_max, which entity rows
are present and how many tokens they own), a dtype, a query scale (x0: uniform attention, x1, x30: sharp
attention, rows with Z < 0.5 and -inf rows), a value scale, knobs and a block step, runs the kernels' real source
on the CPU emulator and compares every intermediate and the output with `decomposed_intermediates` and, with
``--slow-ref``, the output with `slow_reference.slow_deleaker_attention_detailed` where that reference's masks and
cuts are the kernels'. Every mismatch is printed with the case that gives it; the exit code is the number of
failing cases (capped at 100). ``--sweep`` takes every T in `TEXT_LENS` with every grid once, biased towards
cases that edit (2 or more entities, steps inside the intervention window).

Tolerances: masks equal away from near-ties of a threshold; Z within 1e-5 + |s|max ulps of the exact edited
normaliser (p = exp(s - l) carries about |s| ulps of error in float32); output rel. L2 < 1e-2 against the exact
edited attention on the kernels' own masks and cuts, and within 2x the decomposed op's error where its masks and
cuts are the same. Under a fallback threshold below 0.5 only the 2x bound applies (the decomposed op's docstring:
corrections with Z near 0 then stand, with errors of order 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

# The emulator and the references it compares with are test infrastructure, in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import cuda_emulator  # noqa: E402
import slow_reference as slow  # noqa: E402
from deleaker import DeLeakerConfig  # noqa: E402
from deleaker.decomposed import decomposed_intermediates, image_image_cuts, plain_attention_with_lse  # noqa: E402
from deleaker.decomposed import region_thresholds  # noqa: E402
from deleaker.ops import smooth_masks  # noqa: E402
from deleaker.plugins import torch_op  # noqa: E402
from kernel_checks import (  # noqa: E402
    exact_edited_attention,
    image_pbar,
    rel_l2,
    threshold_near_ties,
    check_union,
    NEAR_TIE,
)

WINDOWS = dict(start_aggregating_from=2, stop_aggregating_at=6, start_intervention_from=4, stop_intervention_at=8)


@dataclasses.dataclass
class Case:
    name: str
    batch: int
    heads: int
    text_len: int
    grid: Tuple[int, int]
    head_dim: int
    e_max: int
    present: List[int]  # entity rows with tokens
    token_mode: str  # one, many, contiguous, all, partition
    dtype: torch.dtype
    q_scale: float
    v_scale: float
    config: DeLeakerConfig
    block_step: object  # int or tensor
    seed: int
    fallback_threshold: float = 0.5
    steps: int = 1  # >1: history threaded over block steps 0..steps-1 (inputs reseeded each step)

    def describe(self) -> str:
        cfg = {k: v for k, v in dataclasses.asdict(self.config).items()
               if getattr(DeLeakerConfig(**WINDOWS), k) != v}
        return (f"{self.name}: B{self.batch} H{self.heads} T{self.text_len} g{self.grid[0]}x{self.grid[1]} "
                f"D{self.head_dim} Emax{self.e_max} present={self.present} tokens={self.token_mode} "
                f"{str(self.dtype)[6:]} q*{self.q_scale} v*{self.v_scale} step={self.block_step!r} "
                f"thr={self.fallback_threshold} steps={self.steps} seed={self.seed} cfg={cfg}")


# ---- inputs ------------------------------------------------------------------------------------------------------


def entity_tokens(case: Case, g: torch.Generator) -> List[List[int]]:
    """The text tokens of each present entity (disjoint)."""
    T, present = case.text_len, case.present
    perm = torch.randperm(T, generator=g).tolist()
    out: List[List[int]] = []
    if case.token_mode == "all":
        # The first present entity owns every text token; any other gets none (it is then absent).
        return [list(range(T))] + [[] for _ in present[1:]]
    if case.token_mode == "partition":
        # Every text token belongs to some entity (no neutral token left), non-contiguous.
        parts = [perm[i :: len(present)] for i in range(len(present))]
        return [sorted(p) for p in parts]
    used = 0
    for i, _ in enumerate(present):
        remaining = T - used
        if remaining <= 0:
            out.append([])
            continue
        if case.token_mode == "one":
            size = 1
        elif case.token_mode == "contiguous":
            size = min(remaining, max(1, T // (2 * len(present))))
            out.append(list(range(used, used + size)))
            used += size
            continue
        else:  # many, non-contiguous
            most = max(1, min(8, T // max(1, len(present))))
            size = min(remaining, 1 + int(torch.randint(0, most, (1,), generator=g)))
        out.append(sorted(perm[used : used + size]))
        used += size
    return out


def make_inputs(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, H, T, (gh, gw), D = case.batch, case.heads, case.text_len, case.grid, case.head_dim
    n_img = gh * gw
    N = T + n_img
    q = torch.randn(B, H, N, D, generator=g) * 0.5
    k = torch.randn(B, H, N, D, generator=g) * 0.5
    v = torch.randn(B, H, N, D, generator=g)
    entity_mask = torch.zeros(case.e_max, T, dtype=torch.bool)
    tokens = entity_tokens(case, g)
    dirs = F.normalize(torch.randn(case.e_max, H, D, generator=g), dim=-1)
    amp = (3.0 * math.sqrt(D)) ** 0.5
    for row, toks in zip(case.present, tokens):
        if toks:
            entity_mask[row, toks] = True
            k[:, :, toks] += amp * dirs[row][None, :, None, :]
    ys = torch.arange(gh, dtype=torch.float32)[:, None].expand(gh, gw).reshape(-1)
    xs = torch.arange(gw, dtype=torch.float32)[None, :].expand(gh, gw).reshape(-1)
    radius = max(2.0, 0.3 * min(gh, gw) + 1.0)
    for b in range(B):
        for row in case.present:
            cy = float(torch.rand(1, generator=g)) * (gh - 1)
            cx = float(torch.rand(1, generator=g)) * (gw - 1)
            dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
            weight = (2.0 * (1.0 - dist / radius)).clamp(min=0.0, max=1.0)
            weight = weight * (0.9 + 0.2 * torch.rand(n_img, generator=g))
            q[b, :, T:] += amp * weight[None, :, None] * dirs[row][:, None, :]
            k[b, :, T:] += 0.5 * amp * weight[None, :, None] * dirs[row][:, None, :]
    q = q * case.q_scale
    v = v * case.v_scale
    return q.to(case.dtype), k.to(case.dtype), v.to(case.dtype), entity_mask


# ---- the kernels --------------------------------------------------------------------------------------------------


def run_kernels(library, q, k, v, entity_mask, *, grid, block_step, history, config, fallback_threshold):
    plain, lse = plain_attention_with_lse(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    return torch_op.launch_kernels(
        library, q, k, v, entity_mask, out=plain, lse=lse, grid=grid, block_step=block_step, history=history,
        config=config, stream=0, debug=True, fallback_threshold=fallback_threshold,
    )


# ---- comparison ---------------------------------------------------------------------------------------------------


def compare(case: Case, q, k, v, entity_mask, out, history, views, ref, problems: List[str], slow_ref: bool,
            history_in) -> Dict[str, float]:
    config, grid = case.config, case.grid
    text_len = entity_mask.shape[1]
    info: Dict[str, float] = {}

    def bad(msg: str) -> None:
        problems.append(msg)

    if out.isnan().any() and not ref.out.isnan().any():
        bad(f"NaN in out ({int(out.isnan().sum())} elements) where the decomposed op is finite")
    if history.isnan().any():
        bad("NaN in history")
    # Statistics.
    t = int(case.block_step)
    start, stop = config.start_aggregating_from, config.stop_aggregating_at
    aggregate = config.use_history and (t == start or start < t < stop)
    need_affinity = aggregate or (config.intervenes_at(t) and not (config.use_history and t > start))
    checks = [("history", history, ref.history)]
    if config.intervenes_at(t):  # outside the window the source map is not used (zeros without affinities)
        checks.append(("source", views["source"], ref.source))
    if need_affinity:
        checks.append(("affinity", views["affinity"], ref.affinity))
    for name, got, want in checks:
        try:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, equal_nan=True)
        except AssertionError as exc:
            bad(f"{name} differs: {str(exc).splitlines()[2:5]}")
    inside = config.intervenes_at(int(case.block_step))
    if not inside:
        if not torch.equal(out, views["plain"]):
            bad("outside the window out is not o")
        return info

    # Masks.
    source = ref.source
    std = source.std(-1, keepdim=True)
    threshold = source.mean(-1, keepdim=True) + config.std_mul_text * std
    near = (source - threshold).abs() <= NEAR_TIE * torch.maximum(std, threshold.abs() * 1e-3).clamp(min=1e-30)
    raw_diff = views["raw_masks"] != ref.raw_masks
    if (raw_diff & ~near).any():
        bad(f"{int((raw_diff & ~near).sum())} raw mask tokens differ away from a tie")
    smoothed = smooth_masks(views["raw_masks"], grid) if config.do_smoothing else views["raw_masks"]
    if not torch.equal(views["masks"], smoothed):
        bad("masks are not the morphology of the raw masks")
    try:
        check_union(views, grid[0] * grid[1])
    except AssertionError as exc:
        bad(f"union: {exc}")
    masks = views["masks"]
    info["mask_frac"] = float(masks.float().mean())
    info["union"] = int(views["union_count"].sum())

    # Thresholds and cuts, on the kernels' own masks.
    pbar = image_pbar(q, k, views["lse"], text_len)
    if config.do_image_image:
        thr_ref = region_thresholds(pbar, masks, config)
        if not torch.equal(views["thresholds"].isnan(), thr_ref.isnan()):
            bad(f"threshold NaN pattern differs: {views['thresholds'].isnan().tolist()} vs {thr_ref.isnan().tolist()}")
        else:
            try:
                torch.testing.assert_close(views["thresholds"], thr_ref, rtol=1e-4, atol=1e-9, equal_nan=True)
            except AssertionError as exc:
                bad(f"thresholds differ: {str(exc).splitlines()[2:5]}")
        expected_cut = image_image_cuts(pbar, masks, views["thresholds"])
        ties = threshold_near_ties(pbar, masks, views["thresholds"])
    else:
        expected_cut = ties = torch.zeros_like(pbar, dtype=torch.bool)
    cut = views.get("cut", expected_cut)
    if "cut" in views:
        diff = (cut != expected_cut) & ~ties
        if diff.any():
            bad(f"{int(diff.sum())} cut bits differ away from a tie")
    info["cuts"] = int(cut.sum())
    exact, z_exact = exact_edited_attention(q, k, v, masks, cut, entity_mask, config)
    far = ~ties.any(-1)[:, None, :].expand_as(z_exact)
    zk = views["z"].double()
    # Rows with every key cut (exact Z = 0, softmax undefined) store NaN for Z, as documented: not compared.
    defined = torch.isfinite(exact[:, :, text_len:]).all(-1)
    finite_both = torch.isfinite(zk) & torch.isfinite(z_exact) & defined
    sel = far & finite_both
    if sel.any():
        # p = exp(s - l) in float32 carries a relative error of about |s| ulps: sharp rows (q x30, |s| ~ 1e3) get
        # an absolute error of Z near 1e-4 from that alone, as the decomposed op's.
        s_img = (q[:, :, text_len:].double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s_max = s_img.abs().amax(-1)
        tol = 1e-5 + 1e-4 * z_exact.abs() + 5e-7 * s_max
        diff = (zk - z_exact).abs()
        off = sel & (diff > tol)
        if off.any():
            worst = int(torch.where(off, diff - tol, torch.zeros_like(diff)).flatten().argmax())
            bad(f"Z differs in {int(off.sum())} rows (worst: kernel {float(zk.flatten()[worst]):.6g}, "
                f"exact {float(z_exact.flatten()[worst]):.6g}, |s|max {float(s_max.flatten()[worst]):.4g})")
    in_union = masks.any(1)
    z = views["z"]
    want_fb = in_union[:, None] & ~(torch.isfinite(z) & (z >= case.fallback_threshold))
    if not torch.equal(views["fallback"], want_fb):
        bad(f"fallback rows differ from Z's verdict: {int((views['fallback'] != want_fb).sum())}")
    if int(views["fallback_count"]) != int(views["fallback"].sum()):
        bad(f"fallback_count {int(views['fallback_count'])} != listed {int(views['fallback'].sum())}")
    info["fallback"] = int(views["fallback"].sum())
    plain = views["plain"]
    if not torch.equal(out[:, :, :text_len], plain[:, :, :text_len]):
        bad("text rows changed")
    a = out[:, :, text_len:].permute(0, 2, 1, 3)
    b_ = plain[:, :, text_len:].permute(0, 2, 1, 3)
    if not torch.equal(a[~in_union], b_[~in_union]):
        bad("rows outside the union changed")
    exact_finite = torch.isfinite(exact)
    if (~torch.isfinite(out) & exact_finite).any():
        count = int((~torch.isfinite(out) & exact_finite).sum())
        bad(f"{count} non-finite outputs where the exact edited attention is finite")
    if exact_finite.all():
        err = rel_l2(out, exact)
        info["err"] = err
        # Below 0.5 the fallback threshold lets corrections with Z near 0 stand (the decomposed op's docstring:
        # errors of order 1 at 1e-6): only the 2x bound applies there.
        if not err < 1e-2 and case.fallback_threshold >= 0.5:
            bad(f"output rel. error {err:.3g} vs exact edited attention (>= 1e-2)")
        if torch.equal(masks, ref.masks) and torch.equal(cut, ref.cut):
            err_ref = rel_l2(ref.out, exact)
            info["err_ref"] = err_ref
            if err > 2 * err_ref + 1e-6:
                bad(f"output error {err:.3g} > 2x the decomposed op's {err_ref:.3g}")
    else:
        info["exact_nonfinite"] = int((~exact_finite).sum())
        # Rows the exact attention cannot define (every key cut): compare the rest only.
        rows_ok = exact_finite.all(-1)
        if rows_ok.any():
            err = rel_l2(out[rows_ok], exact[rows_ok])
            info["err"] = err
            if not err < 1e-2:
                bad(f"output rel. error {err:.3g} on defined rows")

    if slow_ref:
        s = slow.slow_deleaker_attention_detailed(q, k, v, entity_mask, grid, int(case.block_step), history_in,
                                                   config)
        if s.text_margin > 1e-3 and not torch.equal(s.masks, masks):
            bad(f"masks differ from the slow reference (text margin {s.text_margin:.3g})")
        if s.image_margin > 1e-3 and not torch.equal(s.image_image_cut, cut):
            bad(f"cuts differ from the slow reference (image margin {s.image_margin:.3g})")
        if torch.equal(s.masks, masks) and torch.equal(s.image_image_cut, cut) and torch.isfinite(s.out).all():
            err_s = rel_l2(out, s.out)
            err_dec = rel_l2(ref.out, s.out)
            info["err_slow"] = err_s
            tol = 1e-2 if case.dtype != torch.float32 else 1e-4
            if not err_s < tol and case.fallback_threshold >= 0.5:
                bad(f"output rel. error {err_s:.3g} vs the float64 slow reference")
            if err_s > 2 * err_dec + 1e-6 and torch.equal(masks, ref.masks):
                bad(f"output error vs slow reference {err_s:.3g} > 2x the decomposed op's {err_dec:.3g}")
    return info


def run_case(library, case: Case, slow_ref: bool) -> Tuple[List[str], Dict[str, float]]:
    problems: List[str] = []
    info: Dict[str, float] = {}
    hist_k = hist_r = None
    steps = range(case.steps) if case.steps > 1 else [None]
    for t in steps:
        seed = case.seed if t is None else case.seed * 1000 + t
        q, k, v, entity_mask = make_inputs(case, seed)
        block_step = case.block_step if t is None else (t if t % 2 else torch.tensor(t))
        step_case = case if t is None else dataclasses.replace(case, block_step=block_step)
        out, hist_new, views = run_kernels(library, q, k, v, entity_mask, grid=case.grid, block_step=block_step,
                                           history=hist_k, config=case.config,
                                           fallback_threshold=case.fallback_threshold)
        ref = decomposed_intermediates(q, k, v, entity_mask, grid=case.grid,
                                       block_step=int(block_step) if t is not None else block_step,
                                       history=hist_r, config=case.config,
                                       fallback_threshold=case.fallback_threshold)
        before = len(problems)
        info = compare(step_case, q, k, v, entity_mask, out, hist_new, views, ref, problems,
                       slow_ref and (t is None or t % 3 == 0), hist_r)
        if len(problems) > before and t is not None:
            problems[before:] = [f"[t={t}] {p}" for p in problems[before:]]
        hist_k, hist_r = hist_new, ref.history
    return problems, info


# ---- the case generator ---------------------------------------------------------------------------------------------

TEXT_LENS = [1, 2, 3, 31, 33, 64, 65, 127, 129, 257, 511, 512]
GRIDS = [(1, 1), (1, 2), (2, 1), (1, 37), (41, 1), (3, 3), (7, 11), (13, 5), (7, 9), (8, 8), (5, 13),
         (9, 7), (1, 64), (64, 1), (1, 65), (5, 13), (3, 43), (1, 127), (8, 16), (3, 43), (127, 1)]
# 63, 64, 65, 127, 128, 129 image tokens
STRADDLE = [(7, 9), (8, 8), (5, 13), (1, 127), (8, 16), (3, 43)]
HEADS = [1, 2, 3, 5, 24]


def random_case(rng: random.Random, index: int, T: Optional[int] = None, grid=None, focused: bool = False) -> Case:
    T = rng.choice(TEXT_LENS) if T is None else T
    grid = rng.choice(GRIDS + STRADDLE) if grid is None else grid
    e_max = rng.randint(2, 8)
    n_present = rng.choice([2, 2, min(e_max, 3), min(e_max, 4), e_max] if focused else [0, 1, 2, e_max, min(e_max, 3)])
    present = sorted(rng.sample(range(e_max), n_present))
    if rng.random() < 0.3 and e_max >= 4 and n_present == 2:
        present = [0, 3]
    mode = rng.choice(["one", "many", "contiguous", "all", "partition"])
    if mode in ("partition",) and len(present) > T:
        mode = "one"
    heads = rng.choice(HEADS)
    n_img = grid[0] * grid[1]
    batch = rng.choice([1, 1, 2, 3])
    # Keep each launch small enough for the emulator.
    while batch * heads * (T + n_img) * max(n_img, 64) > 2_000_000 and heads > 1:
        heads = max(1, heads // 2)
    while batch * heads * (T + n_img) * max(n_img, 64) > 2_000_000 and batch > 1:
        batch -= 1
    dtype = rng.choice([torch.float16, torch.bfloat16])
    q_scale = rng.choice([1.0, 1.0, 1.5, 3.0, 30.0] if focused else [0.0, 1.0, 1.0, 1.0, 3.0, 30.0])
    v_scale = rng.choice([1.0, 1.0, 100.0, 3000.0 if dtype == torch.float16 else 1e6])
    cfg = dict(WINDOWS)
    for switch in ("do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening",
                   "use_history"):
        if rng.random() < 0.15:
            cfg[switch] = False
    r = rng.random()
    if r < 0.1:
        cfg["std_mul_text"] = -10.0  # masks cover everything
    elif r < 0.2:
        cfg["std_mul_text"] = rng.choice([0.0, 2.5, 5.0])
    if rng.random() < 0.15:
        cfg["std_mul_image_image"] = rng.choice([-10.0, -1.0, 0.0, 3.0])
    if rng.random() < 0.15:
        cfg["k_strength"] = rng.choice([0.1, 2.0, 10.0])
    config = DeLeakerConfig(**cfg)
    # Steps at the windows' boundaries.
    step = rng.choice([5, 5, 5, 4, 6, 8] if focused else [3, 4, 5, 6, 8, 9, 2])
    if rng.random() < 0.3:
        step = torch.tensor(step)
    threshold = rng.choice([0.5, 0.5, 0.5, 1.0, 1e-6])
    steps = 1
    if rng.random() < 0.08 and batch * heads * (T + n_img) * max(n_img, 64) < 400_000:
        steps = 10
    return Case(f"case{index}", batch, heads, T, grid, rng.choice([64, 128]), e_max, present, mode, dtype, q_scale,
                v_scale, config, step, seed=index, fallback_threshold=threshold, steps=steps)


def edge_cases() -> List[Case]:
    """Small edge cases for valgrind (``--memcheck``): one-token grids and texts, full masks with every key cut,
    tile-straddling sizes, every entity row present, sharp attention through the fallback."""
    full = DeLeakerConfig(**{**WINDOWS, "std_mul_text": -10.0, "std_mul_image_image": -10.0})
    base = DeLeakerConfig(**WINDOWS)
    return [
        Case("1x1", 1, 1, 1, (1, 1), 64, 2, [0, 1], "one", torch.float16, 1.0, 1.0, base, 5, 1),
        Case("full", 2, 3, 3, (1, 2), 128, 8, [0, 1, 2], "partition", torch.bfloat16, 1.0, 1.0, full, 5, 2),
        Case("full65", 1, 2, 5, (5, 13), 64, 3, [0, 2], "partition", torch.float16, 1.0, 1.0, full,
             torch.tensor(5), 3, fallback_threshold=1.0),
        Case("sharp", 1, 2, 65, (5, 13), 64, 5, [0, 3], "many", torch.float16, 30.0, 100.0, base, 5, 4),
        Case("b3", 3, 1, 33, (1, 65), 128, 4, [0, 1, 2, 3], "contiguous", torch.bfloat16, 1.5, 1.0, base, 5, 5,
             fallback_threshold=1.0),
        Case("129", 1, 2, 129, (8, 16), 128, 8, list(range(8)), "one", torch.float16, 1.0, 1.0, base, 5, 6),
    ]


def run_edges_unchecked() -> None:
    library = cuda_emulator.EmulatedLibrary(cuda_emulator.build_emulated_library())
    library.init()
    for case in edge_cases():
        q, k, v, entity_mask = (x.clone() for x in make_inputs(case, case.seed))  # one allocation each
        _, _, views = run_kernels(library, q, k, v, entity_mask, grid=case.grid, block_step=case.block_step,
                                  history=None, config=case.config, fallback_threshold=case.fallback_threshold)
        print(f"ran {case.describe()}: union {int(views['union_count'].sum())}, fallback "
              f"{int(views['fallback'].sum())}", flush=True)


def memcheck() -> int:
    import shutil
    import subprocess
    import tempfile

    from cuda_emulator.memcheck import kernel_errors

    if shutil.which("valgrind") is None:
        print("--memcheck needs valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "memcheck.log"
        command = ["valgrind", "--tool=memcheck", "--max-stackframe=4000000", f"--log-file={log_path}",
                   sys.executable, __file__, "--edges-child"]
        child = subprocess.run(command, env={**__import__("os").environ, "PYTHONMALLOC": "malloc"})
        errors = kernel_errors(log_path.read_text())
    for record in errors:
        print(record, file=sys.stderr)
    print(f"memcheck: {len(errors)} errors in the emulated kernels (child exit {child.returncode})")
    return 1 if errors or child.returncode else 0


def main() -> int:
    if sys.argv[1:] == ["--edges-child"]:
        run_edges_unchecked()
        return 0
    if sys.argv[1:] == ["--memcheck"]:
        return memcheck()
    if sys.argv[1:2] == ["--edges"]:
        library = cuda_emulator.EmulatedLibrary(cuda_emulator.build_emulated_library())
        library.init()
        failures = 0
        for case in edge_cases():
            problems, info = run_case(library, case, slow_ref="--slow-ref" in sys.argv)
            print(f"{'FAIL' if problems else 'ok'} {case.describe()} {info}", flush=True)
            for p in problems:
                print(f"      - {p}", flush=True)
            failures += bool(problems)
        return failures
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, default=None)
    parser.add_argument("--slow-ref", action="store_true")
    parser.add_argument("--defines", default="")
    parser.add_argument("--sweep", action="store_true", help="every T x grid once, focused on edited cases")
    args = parser.parse_args()
    defines = tuple(d for d in args.defines.split(",") if d)
    library = cuda_emulator.EmulatedLibrary(cuda_emulator.build_emulated_library(defines=defines))
    library.init()
    rng = random.Random(args.seed)
    failures = 0
    pairs = [(T, g) for T in TEXT_LENS for g in sorted(set(GRIDS + STRADDLE))]
    if args.sweep:
        args.cases = len(pairs)
    for index in range(args.cases):
        if args.sweep:
            case = random_case(rng, args.seed * 100000 + index, *pairs[index], focused=True)
        else:
            case = random_case(rng, args.seed * 100000 + index)
        if args.only is not None and index != args.only:
            continue
        start = time.time()
        try:
            problems, info = run_case(library, case, args.slow_ref)
        except Exception as exc:  # noqa: BLE001 - a crash is a finding
            problems, info = [f"raised {type(exc).__name__}: {exc}".splitlines()[0][:400]], {}
            traceback.print_exc()
        took = time.time() - start
        status = "FAIL" if problems else "ok"
        print(f"[{index}] {status} {took:.1f}s {case.describe()} {info}", flush=True)
        for p in problems:
            print(f"      - {p}", flush=True)
        failures += bool(problems)
    print(f"{failures} failing of {args.cases}")
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
