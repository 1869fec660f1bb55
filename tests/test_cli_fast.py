"""``deleaker-trt`` answers ``--help`` and bad input without importing torch (a fresh process each, as a user
runs it): well under a second on a 2-core machine, where importing torch, diffusers and transformers took 5-7 s.

The time bounds are generous (1.5 s; measured about 0.1-0.3 s here, 1.6-1.7 s for ``--help`` and ~5 s for an
input error before the CLI's imports were made lazy); the import checks are what hold on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

BOUND_S = 1.5

# Runs the CLI in this process and reports whether torch was imported, whatever the exit.
PROBE = """
import sys
from deleaker.runtime.cli import main
try:
    main(sys.argv[1:], prog_name="deleaker-trt")
finally:
    print("TORCH_IMPORTED=%s" % ("torch" in sys.modules), file=sys.stderr)
"""


def _cli(*args: str, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    return done, time.perf_counter() - start


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["verify", "--help"], ["build", "--help"]])
def test_help_is_fast_and_needs_no_torch(args):
    done, seconds = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "TORCH_IMPORTED=False" in done.stderr
    assert seconds < BOUND_S, f"{args} took {seconds:.2f} s"


def test_build_help_shows_the_default_precision_and_one_entity_limit():
    from deleaker.engines.build import PRECISIONS as BUILD_PRECISIONS
    from deleaker.plugins.kernels import MAX_ENTITIES
    from deleaker.export.limits import DEFAULT_PRECISION, PRECISIONS

    assert PRECISIONS == BUILD_PRECISIONS and DEFAULT_PRECISION == "fp16"
    build_help, _ = _cli("build", "--help")
    assert "[default: fp16]" in build_help.stdout and f"at most {MAX_ENTITIES})" in build_help.stdout
    run_help, _ = _cli("run", "--help")
    assert f"at most {MAX_ENTITIES})" in run_help.stdout


GOOD = ["run", "--model", "tiny", "--prompt", "a cat and a dog", "--entities", "cat,dog"]


def _with(**changes: str) -> list[str]:
    args = list(GOOD)
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


BUILD = ["build", "--model", "tiny", "--onnx-only", "--text-len", "32", "--height", "64", "--width", "64",
         "--out", "E/b3"]  # fmt: skip


def _build(**changes: str | list[str]) -> list[str]:
    args = list(BUILD)
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        if flag in args:
            at = args.index(flag) + 1
            args[at : at + len(values)] = values
        else:
            args += [flag, *values]
    return args


@pytest.mark.parametrize(
    "args,message",
    [
        (_with(guidance="inf"), "guidance must be a finite number in [0, 100]"),
        (_with(guidance="-inf"), "guidance must be a finite number"),
        (_with(guidance="nan"), "guidance must be a finite number"),
        (_with(guidance="3e38"), "guidance must be a finite number"),
        (_with(guidance="1e308"), "guidance must be a finite number"),
        (_with(seed="-1"), "seed must be an int in [0, 2**63)"),
        (_with(seed=str(2**64)), "seed must be an int in [0, 2**63)"),
        (_with(steps="0"), "steps must be an int in [1, 1000]"),
        (_with(steps="100000"), "steps must be an int in [1, 1000]"),
        (_with(width="0"), "width must be an int in [1, 2048] pixels, got 0"),
        (_with(height="-64"), "height must be an int in [1, 2048] pixels"),
        (_with(height=str(10**30)), "height must be an int in [1, 2048] pixels"),
        (_with(set="k_strength=inf"), "k_strength must be a finite number"),
        (_with(set="k_strength=1e400"), "k_strength must be a finite number"),
        (_with(set="k_strength=NaN"), "k_strength must be a finite number"),
        (_with(set="k_strength=-1"), "k_strength must be in (0, 10]"),
        (_with(set="k_strength=0"), "k_strength must be in (0, 10]"),
        (_with(set="std_mul_text=3e38"), "std_mul_text must be in [-10, 10]"),
        (_with(set="stop_intervention_at=1e23"), "stop_intervention_at must be an int (block steps)"),
        (_with(set="stop_intervention_at=100000000000000000000000"), "must be in [0, 2**31 - 1]"),
        (_with(set="start_aggregating_from=-1"), "start_aggregating_from must be in [0, 2**31 - 1]"),
        (_with(set="use_history=1"), "use_history must be a bool"),
        (_with(entities="cat,cow"), "not found in the prompt: ['cow']"),
        (_with(entities="cat"), "at least 2"),
        (_with(entities="cat,cat"), "duplicate"),
        (_with(entities="cat,,dog"), "the 2nd entity is empty or whitespace"),
        ([*GOOD, "--set", "k_strength=1.5", "--set", "k_strength= 2"],
         "--set k_strength is given twice ('k_strength=1.5' and 'k_strength= 2'); give each knob once"),
        ([*BUILD, "--set", "k_strength=0"], "k_strength must be in (0, 10]"),
        ([*BUILD, "--set", "no_such_knob=1"], "unknown DeLeaker option(s) ['no_such_knob']"),
        (_with(entities="cat,dog,"), "the 3rd entity is empty or whitespace"),
        (_with(set="k_strength=1" + "0" * 400), "k_strength must be in (0, 10], got 1000000000"),
        (
            _with(set="stop_intervention_at=1" + "0" * 5000),
            "stop_intervention_at must be an int (block steps) in [0, 2**31 - 1], got inf",
        ),
        (_with(out=".png"), "output .png has no name before .png"),
        (_with(out="a" * 300 + ".png"), "is too long: at most"),
        (_with(out="d" * 300 + "/x.png"), "cannot be written: File name too long"),
        (_with(out="x.jpg"), "must end in .png"),
        (["run", "--model", "tiny", "--prompts", "/"], "prompts file / is a directory"),
        (["run", "--model", "tiny", "--prompts", "no-such.jsonl"], "prompts file no-such.jsonl does not exist"),
        (_with(backend="torch", device="nonsense"), "device must be 'cpu', 'cuda' or 'cuda:N', got 'nonsense'"),
        (_with(backend="torch", device="meta"), "device must be 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
        ([*GOOD, "--set", "start_intervention_from=5", "--set", "stop_intervention_at=4"],
         "stop_intervention_at (4) must be >= start_intervention_from (5)"),
        (_with(model="/no/such/model"), "model '/no/such/model' is neither 'tiny' nor a directory"),
        (["run", "--engines", "/no/such/engines", *GOOD[3:]], "engine directory /no/such/engines does not exist"),
        (["run", "--engines", "/etc/passwd", *GOOD[3:]], "engine directory /etc/passwd is not a directory"),
        (_with(cache_dir="/etc/passwd"), "cache directory /etc/passwd is not a directory"),
        (["verify", *GOOD[1:], "--max-rel-err", "nan"], "max_rel_err must be a finite number > 0"),
        (["verify", *GOOD[1:], "--min-psnr", "inf"], "min_psnr must be a finite number > 0"),
        # build: every bound its manifests enforce, before torch (a manifest refused after a 15 s export left an
        # ONNX without one)
        (_build(height="2056"), "height must be an int in [1, 2048] pixels, got 2056"),
        (_build(width="4096"), "width must be an int in [1, 2048] pixels, got 4096"),
        (_build(batch=["1", "1", "65"]), "1 <= min <= opt <= max <= 64, got (1, 1, 65)"),
        (_build(batch=["2", "1", "4"]), "1 <= min <= opt <= max <= 64, got (2, 1, 4)"),
        # Every bad value of an option in the README's table is exit 1 with its allowed range, as an out-of-range
        # number (click's types made these usage errors, exit 2), in run, verify and build alike.
        (_with(text_len="0"), "text_len must be an int in [1, 512] (T5 tokens), got 0"),
        (_with(text_len="513"), "text_len must be an int in [1, 512] (T5 tokens), got 513"),
        (_with(max_entities="9"), "max_entities must be an int in [2, 8] (the kernels take at most 8 entities)"),
        (_with(max_entities="1"), "max_entities must be an int in [2, 8]"),
        (_with(seed="1.0"), "seed must be an int in [0, 2**63), got '1.0'"),
        (_with(steps="abc"), "steps must be an int in [1, 1000], got 'abc'"),
        (_with(guidance="x"), "guidance must be a finite number in [0, 100]"),
        (_with(height="abc"), "height must be an int in [1, 2048] pixels, got 'abc'"),
        (_with(set="k_strength=abc"), "k_strength must be a finite number in (0, 10], got 'abc'"),
        (_with(set="k_strength="), "k_strength must be a finite number in (0, 10], got ''"),
        (_with(set="k_strength=0x5"), "k_strength must be a finite number in (0, 10], got '0x5'"),
        (_with(set="std_mul_text=x"), "std_mul_text must be a finite number in [-10, 10], got 'x'"),
        (_with(set="use_history=yes"), "use_history must be a bool (true or false), got 'yes'"),
        (_with(set="stop_intervention_at=1.5"), "must be an int (block steps) in [0, 2**31 - 1], got 1.5"),
        (["verify", *GOOD[1:], "--max-rel-err", "abc"], "max_rel_err must be a finite number > 0"),
        (["verify", *GOOD[1:], "--text-len", "513"], "text_len must be an int in [1, 512]"),
        # The reference is PyTorch: this compared PyTorch with itself and said PASS with identical images.
        (["verify", *GOOD[1:], "--backend", "torch"], "--backend torch would compare PyTorch with itself"),
        (_build(height="0"), "height must be an int in [1, 2048] pixels, got 0"),
        (_build(width="abc"), "width must be an int in [1, 2048] pixels, got 'abc'"),
        (_build(text_len="513"), "text_len must be an int in [1, 512] (T5 tokens), got 513"),
        (_build(text_len="0"), "text_len must be an int in [1, 512] (T5 tokens), got 0"),
        (_build(max_entities="9"), "max_entities must be an int in [2, 8]"),
        (_build(batch=["1", "1", "x"]), "1 <= min <= opt <= max <= 64, got (1, 1, 'x')"),
        # build refused a mistyped --model only after importing torch to load it (~9 s, "loading model ..." first)
        (_build(model="/no/such/model"), "error: model '/no/such/model' is neither 'tiny' nor a directory"),
    ],
)
def test_bad_input_is_one_error_line_fast_without_torch(tmp_path, args, message):
    done, seconds = _cli(*args, cwd=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("TORCH_IMPORTED=")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "TORCH_IMPORTED=False" in done.stderr
    assert list(tmp_path.iterdir()) == [], "no output, no folder"
    assert seconds < BOUND_S, f"{args} took {seconds:.2f} s"


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"prompt": "a cat and a dog ' + b"x" * (40 << 20) + b'", "entities": ["cat", "dog"]}\n', "longer than"),
        (
            json.dumps({"prompt": "a cat and a dog " + "x " * 200_000, "entities": ["cat", "dog"]}).encode(),
            "the prompt has 400016 characters; at most 20000",
        ),
        (b'{"prompt": "a cat \xff and a dog", "entities": ["cat", "dog"]}\n', "line 1: not UTF-8 text"),
        (b"[" * 200_000 + b"]" * 200_000 + b"\n", "line 1: JSON nested too deeply"),
        (b'{"prompt": ' * 100_000 + b"\n", "line 1: "),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
        (b'"a cat and a dog"\n', "line 1: expected a JSON object"),
        (b"\n\n  \n", "has no prompts"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1e30}\n', "'seed' must be"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": ' + b"9" * 30 + b"}\n", "seed"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1' + b"0" * 5000 + b"}\n",
         "line 1: unreadable JSON"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "other": -' + b"7" * 5000 + b"}\n",
         "line 1: unreadable JSON"),
        (b'{"prompt": "a cat and a dog", "entities": "cat,dog"}\n', "'entities' must be a list of strings"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"]}\n{"prompt": 1}\n', "line 2: 'prompt'"),
        (b'\xef\xbb\xbf{"prompt": "a cat and a dog", "entities": ["cat", "cow"]}\n', "line 1: entities not found"),
        # A setting of the whole run, given on a line, was ignored silently; a key that is no setting still is.
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "subset": "x", "steps": 4, "width": 64}\n',
         "line 1: set for the whole run, not per line: 'steps' by --steps, 'width' by --width"),
        # Python's json keeps the last of two equal keys: this line ran seed 2 without a word.
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1, "seed": 2}\n',
         "line 1: duplicate key 'seed' in a JSON object"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "meta": {"a": 1, "a": 1}}\n',
         "line 1: duplicate key 'a'"),
        (b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "other": NaN}\n', "line 1: NaN is not JSON"),
    ],
    # Short ids: pytest puts the id in PYTEST_CURRENT_TEST, which the CLI's child process inherits; an id made from
    # a 40 MiB parameter passes the kernel's 128 KiB limit on one environment string (E2BIG at exec).
    ids=[
        "line-over-40MiB", "prompt-over-20000-chars", "not-utf8", "deep-list", "deep-object", "json-list",
        "json-string", "blank-lines", "seed-float", "seed-huge", "seed-5000-digits", "ignored-key-5000-digits",
        "entities-not-list", "second-line-bad", "bom-unknown", "per-run-settings", "duplicate-seed",
        "duplicate-nested", "nan-constant",
    ],
)
def test_bad_prompts_file_is_refused_fast(tmp_path, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(content)
    done, seconds = _cli("run", "--model", "tiny", "--prompts", prompts, "--out-dir", tmp_path / "out")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("TORCH_IMPORTED=")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], [x[:200] for x in lines]
    assert "TORCH_IMPORTED=False" in done.stderr
    assert not (tmp_path / "out").exists()
    assert seconds < BOUND_S, f"took {seconds:.2f} s"


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_prompts_line_limit_counts_the_line_not_its_ending(tmp_path, ending):
    from deleaker.runtime.jobs import MAX_LINE_BYTES, BatchFileError, read_prompts

    head = b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "pad": "'
    line = head + b"x" * (MAX_LINE_BYTES - len(head) - 2) + b'"}'
    assert len(line) == MAX_LINE_BYTES
    prompts = tmp_path / "p.jsonl"
    lines = 2 if ending else 1  # without a line ending, only the file's last line
    prompts.write_bytes((line + ending) * lines)
    assert [number for number, _ in read_prompts(prompts)] == list(range(1, lines + 1))
    prompts.write_bytes(line[:-2] + b'x"}' + ending)
    with pytest.raises(BatchFileError, match=f"line 1: longer than {MAX_LINE_BYTES} bytes"):
        read_prompts(prompts)


def test_batch_output_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat and a dog", "entities": ["cat", "dog"]}) + "\n")
    (tmp_path / "out" / "0000.png").mkdir(parents=True)
    done, seconds = _cli("run", "--model", "tiny", "--prompts", prompts, "--out-dir", tmp_path / "out")
    assert done.returncode == 1 and f"output {tmp_path / 'out' / '0000.png'} is a directory" in done.stderr
    assert "TORCH_IMPORTED=False" in done.stderr and seconds < BOUND_S
    not_a_dir, _ = _cli("run", "--model", "tiny", "--prompts", prompts, "--out-dir", prompts)
    assert not_a_dir.returncode == 1 and "is not a directory" in not_a_dir.stderr


@pytest.mark.parametrize("code, ends_at_once", [(130, True), (143, True), (1, False), (0, False), (2, False)])
def test_the_entry_point_ends_an_interrupted_command_at_once(monkeypatch, code, ends_at_once):
    """After Ctrl-C (130) or SIGTERM (143) the process ends with that code through ``os._exit`` (the interpreter's
    own exit once turned a handled Ctrl-C into death by SIGINT); every other exit goes the usual way."""
    from deleaker.runtime import cli

    def command() -> None:
        raise SystemExit(code)

    class Ended(Exception):
        """What the stand-in for ``os._exit`` raises: the real one never returns."""

    ended = []

    def exit_now(status: int) -> None:
        ended.append(status)
        raise Ended

    monkeypatch.setattr(cli, "main", command)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    if ends_at_once:
        with pytest.raises(Ended):
            cli.entry_point()
        assert ended == [code]
    else:
        with pytest.raises(SystemExit) as exc:
            cli.entry_point()
        assert exc.value.code == code and ended == []


def _one_line_batch(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat and a dog", "entities": ["cat", "dog"]}) + "\n")
    return prompts


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("stranger", ["jpeg", "prompts-file", "png-without-record"])
def test_batch_never_replaces_a_file_it_did_not_write(tmp_path, stranger, overwrite):
    """A user's JPEG saved as 0000.png, or the prompts file itself stored as the first output, was replaced by the
    first image with exit 0. Only a PNG carrying our record may be replaced; the rest is refused before the model
    loads, naming it, with or without --overwrite."""
    from PIL import Image

    prompts = _one_line_batch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "0000.png"
    if stranger == "jpeg":
        Image.new("RGB", (8, 8), "red").save(target, format="JPEG")
    elif stranger == "prompts-file":
        target.write_bytes(prompts.read_bytes())
    else:
        Image.new("RGB", (8, 8), "red").save(target, format="PNG")
    before = target.read_bytes()
    done, seconds = _cli("run", "--model", "tiny", "--prompts", target if stranger == "prompts-file" else prompts,
                         "--out-dir", out, *(["--overwrite"] if overwrite else []))
    lines = [line for line in done.stderr.splitlines() if not line.startswith("TORCH_IMPORTED=")]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert f"{target} (" in lines[0] and "has no record of its settings" in lines[0] and "never replaced" in lines[0]
    assert "TORCH_IMPORTED=False" in done.stderr and seconds < BOUND_S
    assert target.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["0000.png"]


@pytest.mark.parametrize("kind", ["fifo", "socket", "symlink"])
@pytest.mark.parametrize("mode", ["batch", "single"])
def test_special_file_at_an_output_path_is_refused_unopened(tmp_path, kind, mode, make_special_file):
    """A FIFO at an output path blocked forever in Image.open once the model had loaded. Whatever is there and is
    not a regular file is refused before any work, never opened nor replaced."""
    import os

    prompts = _one_line_batch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("0000.png" if mode == "batch" else "x.png")
    make_special_file(target, kind, tmp_path / "elsewhere.png", b"the user's")
    args = ["--prompts", prompts, "--out-dir", out] if mode == "batch" else [
        "--prompt", "a cat and a dog", "--entities", "cat,dog", "--out", target]
    done, seconds = _cli("run", "--model", "tiny", *args)
    named = {"fifo": "a FIFO", "socket": "a socket", "symlink": "a symbolic link"}[kind]
    assert done.returncode == 1 and f"output {target} is {named}, not a regular file" in done.stderr, done.stderr
    assert "TORCH_IMPORTED=False" in done.stderr and seconds < BOUND_S
    assert os.path.lexists(target) and not os.path.isfile(target) or kind == "symlink"
    if kind == "symlink":
        assert target.is_symlink() and (tmp_path / "elsewhere.png").read_bytes() == b"the user's"


@pytest.mark.parametrize("command", ["plugin", "build"])
@pytest.mark.parametrize("where", ["a-file", "through-a-file", "proc"])
def test_an_impossible_out_folder_is_one_error_line(tmp_path, command, where):
    """`plugin --out /proc/x` or through a file printed FileNotFoundError/NotADirectoryError tracebacks; `--out FILE`
    exited 2 with click's usage text. A bad folder is a bad value: one `error:` line, exit 1, before any work."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's")
    out = {"a-file": a_file, "through-a-file": a_file / "sub", "proc": "/proc/deleaker-x"}[where]
    args = ["plugin", "--out", out, "--stand-in-headers"] if command == "plugin" else _build(out=str(out))
    done, seconds = _cli(*args, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("TORCH_IMPORTED=")]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "the output folder (--out)" in lines[0] and "Traceback" not in done.stderr
    assert "TORCH_IMPORTED=False" in done.stderr and seconds < BOUND_S
    assert a_file.read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("derived", ["compare", "masks"])
def test_single_out_never_replaces_a_file_of_a_derived_name_it_did_not_write(tmp_path, derived):
    """`run --out x.png --compare` wrote x_compare.png over whatever was there (likewise --save-masks' x_masks.png):
    the user named x.png, never the derived names. A file there that is not a PNG of ours is refused before the
    model loads, naming it, and nothing is written."""
    from PIL import Image

    out = tmp_path / "x.png"
    target = tmp_path / f"x_{derived}.png"
    Image.new("RGB", (8, 8), "red").save(target, format="JPEG")
    before = target.read_bytes()
    flag = "--compare" if derived == "compare" else "--save-masks"
    done, seconds = _cli("run", "--model", "tiny", "--prompt", "a cat and a dog", "--entities", "cat,dog",
                         "--out", out, flag)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("TORCH_IMPORTED=")]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert f"{target} (" in lines[0] and "has no record of its settings" in lines[0] and "--out" in lines[0]
    assert "TORCH_IMPORTED=False" in done.stderr and seconds < BOUND_S
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
