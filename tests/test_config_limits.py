"""Knobs at and beyond float32's range: refused before work, or computed to inf/NaN without killing the process."""

from __future__ import annotations


import pytest

from deleaker.errors import ConfigError
from deleaker.runtime.runtime import DeLeakerRuntime

from hostile_use import CLI, PROMPT, TEXT_LEN, assert_no_abort, child


def test_knob_that_does_not_fit_float32_is_refused_before_work(tmp_path):
    cache = tmp_path / "cache"
    for knobs in ({"k_strength": 1e39}, {"std_mul_text": -1e300}, {"stop_intervention_at": 2**64}):
        with pytest.raises(ConfigError, match=r"must be (in|an int in) [\(\[]"):
            DeLeakerRuntime.from_model("tiny", text_len=TEXT_LEN, cache_dir=cache, deleaker_config=knobs)
    assert not cache.exists()  # refused before any export
    args = CLI + ["run", "--model", "tiny", "--cache-dir", cache, "--set", "k_strength=1e39", "--prompt", PROMPT]
    proc = child([str(a) for a in args + ["--entities", "cat,cheetah", "--out", tmp_path / "x.png"]])
    assert_no_abort(proc, proc.stderr)
    assert proc.returncode == 1 and "k_strength" in proc.stderr and "(0, 10]" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_knob_at_the_edge_of_float32_does_not_abort(tmp_path):
    """3e38 fits float32 but overflows once multiplied with a logit: the graph computes inf/NaN, no process dies."""
    args = CLI + ["run", "--model", "tiny", "--text-len", "16", "--cache-dir", tmp_path / "cache", "--steps", "2"]
    args += ["--set", "k_strength=3e38", "--set", "start_intervention_from=0", "--set", "std_mul_text=0.5"]
    args += ["--prompt", PROMPT, "--entities", "cat,cheetah", "--out", tmp_path / "x.png", "--no-progress"]
    proc = child([str(a) for a in args])
    assert_no_abort(proc, proc.stderr)
    assert proc.returncode in (0, 1), proc.stderr
