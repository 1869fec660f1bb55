"""Engine folders (`deleaker.runtime.engine_dir`, `deleaker.engines.manifest`): a folder from someone else is
checked before any work, what `build` writes runs with `run --engines` on a CPU-only machine, and a killed build
leaves nothing for the next."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

from deleaker.engines import build as build_lib
from deleaker.engines.manifest import EngineManifest, ManifestError, sha256_file
from deleaker.errors import ConfigError
from deleaker.runtime.images import psnr
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest
from deleaker.staging import staging_name

from hostile_use import (
    ENTITIES, KNOBS, MANIFEST_NAME, ONNX_NAME, PROMPT, TEXT_LEN, build_tiny_onnx, copy_built, edit_manifest,
    invoke_cli, python_child, run_engines, set_attributes,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """What `deleaker-trt build --onnx-only` writes for the tiny model (fp16, 64x64, T = 16, knobs that act)."""
    return build_tiny_onnx(tmp_path_factory.mktemp("built"))


def _outside_artifact(engines: Path, data: dict) -> None:
    outside = engines.parent / "x.onnx"
    shutil.copy(engines / ONNX_NAME, outside)
    data["artifact"] = "../x.onnx"


def _absolute_artifact(engines: Path, data: dict) -> None:
    data["artifact"] = str((engines / ONNX_NAME).resolve())


def _symlinked_artifact(engines: Path, data: dict) -> None:
    outside = engines.parent / "elsewhere.onnx"
    shutil.move(engines / ONNX_NAME, outside)
    (engines / ONNX_NAME).symlink_to(outside)


def _passwd_data_file(engines: Path, data: dict) -> None:
    data["data_files"] = {"/etc/passwd": sha256_file("/etc/passwd")}


def _relative_passwd_data_file(engines: Path, data: dict) -> None:
    depth = len(engines.resolve().parts) - 1
    data["data_files"] = {"../" * depth + "etc/passwd": sha256_file("/etc/passwd")}


@pytest.mark.parametrize(
    "escape,message",
    [
        (_outside_artifact, "resolves to .*x.onnx, outside"),
        (_absolute_artifact, "artifact must name a file relative to its directory"),
        (_symlinked_artifact, "resolves to .*elsewhere.onnx, outside"),
        (_passwd_data_file, "data_files must name a file relative to its directory"),
        (_relative_passwd_data_file, "data file .* resolves to /etc/passwd, outside"),
    ],
)
def test_every_path_a_manifest_names_stays_inside_its_directory(built, tmp_path, escape, message):
    engines = copy_built(built, tmp_path)
    edit_manifest(engines, lambda data: escape(engines, data))
    with pytest.raises(ManifestError, match=message):
        EngineManifest.read(engines / MANIFEST_NAME).check_artifact(engines)
    result = run_engines(engines, tmp_path)
    assert result.exit_code == 1 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("key, change", [("config", {"k_strength": 2.0}), ("io", {"text_len": 32})])
def test_an_onnx_that_records_another_contract_than_its_manifest_is_refused_before_any_work(
    built, tmp_path, key, change
):
    """Another graph swapped in and rehashed: what the graph records (its exporter's metadata) must be its
    manifest's, checked before the portable conversion makes a cache entry."""
    from deleaker.export.exporter import META_CONFIG, META_IO

    engines = copy_built(built, tmp_path)
    model = onnx.load(str(engines / ONNX_NAME))
    meta_key = {"config": META_CONFIG, "io": META_IO}[key]
    (prop,) = [p for p in model.metadata_props if p.key == meta_key]
    prop.value = json.dumps({**json.loads(prop.value), **change})
    onnx.save(model, str(engines / ONNX_NAME))
    digest = sha256_file(engines / ONNX_NAME)
    edit_manifest(engines, lambda data: data.update(artifact_sha256=digest, onnx_sha256=digest))
    what = {"config": "DeLeaker config", "io": "I/O contract"}[key]
    result = run_engines(engines, tmp_path)
    assert result.exit_code == 1 and f"records another {what}" in result.stderr, result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"k_strength": 5.0}, "has k_strength=5.0 where its manifest says 1.2"),
        ({"grid_h": 4, "grid_w": 16}, r"has grid=\(4, 16\) where its manifest says \(8, 8\)"),  # 64 tokens either way
        ({"block_offset": 0}, r"nodes for block offsets \[0, 0, 0, 0\]"),
    ],
    ids=["knob", "grid", "block_offset"],
)
def test_node_attributes_that_are_not_the_manifests_are_refused_before_any_work(built, tmp_path, edit, message):
    """The nodes' attributes are what runs; the image record says the manifest's knobs. A graph whose nodes were
    edited (metadata untouched) and rehashed used to run with the edited knobs and record the manifest's."""
    engines = copy_built(built, tmp_path)
    model = onnx.load(str(engines / ONNX_NAME))
    for node in model.graph.node:
        set_attributes(node, edit)
    onnx.save(model, str(engines / ONNX_NAME))
    digest = sha256_file(engines / ONNX_NAME)
    edit_manifest(engines, lambda data: data.update(artifact_sha256=digest, onnx_sha256=digest))
    result = run_engines(engines, tmp_path)
    assert result.exit_code == 1 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "cache").exists()


_CHECK_FIFO = r"""
import sys
from deleaker.engines.manifest import EngineManifest, ManifestError
try:
    EngineManifest.read(sys.argv[1] + "/transformer.64x64.fp16.onnx.manifest.json").check_artifact(sys.argv[1])
except ManifestError as exc:
    print("REFUSED", exc)
"""


def test_no_file_outside_the_directory_is_read_before_refusal(built, tmp_path):
    """A data file that escapes through a symlink to a FIFO: reading it would block forever, refusing does not."""
    engines = copy_built(built, tmp_path)
    os.mkfifo(tmp_path / "fifo")
    (engines / "weights.data").symlink_to(tmp_path / "fifo")
    edit_manifest(engines, lambda data: data.update(data_files={"weights.data": "0" * 64}))
    proc = python_child(_CHECK_FIFO, engines, timeout=120)
    assert "REFUSED" in proc.stdout and "outside" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(k_strength=float("nan")), "k_strength must be a finite number"),
        (lambda c: c.update(k_strength=1e39), r"k_strength must be in \(0, 10\]"),
        (lambda c: c.update(k_strength="1.2"), "k_strength must be a finite number"),
        (lambda c: c.update(use_history=1), "use_history must be a bool"),
        (lambda c: c.update(surprise=1), r"unknown \['surprise'\]"),
        (lambda c: c.pop("k_strength"), r"missing \['k_strength'\]"),
    ],
)
def test_manifest_knobs_are_validated_like_cli_input(built, tmp_path, edit, message):
    engines = copy_built(built, tmp_path)
    edit_manifest(engines, lambda data: edit(data["deleaker_config"]))
    with pytest.raises(ManifestError, match=message):
        EngineManifest.read(engines / MANIFEST_NAME)
    result = run_engines(engines, tmp_path)
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "Traceback" not in result.output


def _write_raw(engines: Path, data: bytes) -> None:
    (engines / MANIFEST_NAME).write_bytes(data)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda e: _write_raw(e, b"\xff\xfe{not utf-8"), "is not UTF-8 text"),
        (lambda e: _write_raw(e, b"[" * 200_000), "is not valid JSON"),
        (lambda e: _write_raw(e, b" " * (17 * 2**20)), "larger than 16 MiB"),
        (lambda e: edit_manifest(e, lambda d: d["io"].update(height="abc")), "height must be a positive int"),
        (lambda e: edit_manifest(e, lambda d: d.update(io=None)), "must be a JSON object"),
        (lambda e: edit_manifest(e, lambda d: d["io"].update(text_len=100000)), "text_len is 100000; at most 512"),
        (lambda e: edit_manifest(e, lambda d: d["io"].update(height=4096)), "height is 4096; at most 2048"),
        (lambda e: edit_manifest(e, lambda d: d["io"].update(batch_max=10**9)), "batch_max is 1000000000"),
        (lambda e: edit_manifest(e, lambda d: d.update(artifact_sha256=7)), "must be a hex SHA-256"),
        (lambda e: edit_manifest(e, lambda d: d.update(data_files=[])), "data_files must be an object"),
        (lambda e: edit_manifest(e, lambda d: d["io"].update(joint_attention_dim=64)), "differ from its fields'"),
    ],
)
def test_malformed_manifest_is_one_clean_error_before_allocation(built, tmp_path, damage, message):
    engines = copy_built(built, tmp_path)
    damage(engines)
    started = time.perf_counter()
    result = run_engines(engines, tmp_path)
    assert result.exit_code == 1 and re.search(message, result.stderr), result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output
    assert time.perf_counter() - started < 60 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("graph_agrees", [True, False], ids=["graph-and-manifest", "manifest-only"])
def test_manifest_contract_must_be_the_models(built, tmp_path, graph_agrees):
    """A contract that parses but is not what the model's config gives (another width of T5 embeddings): in the
    manifest and the graph's own record alike (another model's build), or in the manifest only (an edit, caught
    before the model loads: the graph records another contract)."""
    from deleaker.export.contract import FluxTransformerIO
    from deleaker.export.exporter import META_IO

    engines = copy_built(built, tmp_path)
    io = FluxTransformerIO.from_dict(EngineManifest.read(engines / MANIFEST_NAME).io)
    other = dataclasses.replace(io, joint_attention_dim=64).to_dict()
    changes = {"io": other}
    if graph_agrees:
        model = onnx.load(str(engines / ONNX_NAME))
        (prop,) = [p for p in model.metadata_props if p.key == META_IO]
        prop.value = json.dumps(other, sort_keys=True)
        onnx.save(model, str(engines / ONNX_NAME))
        digest = sha256_file(engines / ONNX_NAME)
        changes.update(artifact_sha256=digest, onnx_sha256=digest)
    edit_manifest(engines, lambda data: data.update(changes))
    result = run_engines(engines, tmp_path)
    message = "was built for another model than tiny" if graph_agrees else "records another I/O contract"
    assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_weights_in_a_file_the_manifest_does_not_name_are_refused(built, tmp_path):
    engines = copy_built(built, tmp_path)
    model = onnx.load(str(engines / ONNX_NAME))
    onnx.save(model, str(engines / ONNX_NAME), save_as_external_data=True, location="hidden.bin", size_threshold=0)
    edit_manifest(engines, lambda data: data.update(artifact_sha256=sha256_file(engines / ONNX_NAME)))
    result = run_engines(engines, tmp_path)
    assert result.exit_code == 1
    assert "reads weights from 'hidden.bin', which its manifest does not name" in result.stderr


def test_a_killed_build_leaves_nothing_for_the_next_build(built, tmp_path):
    out = copy_built(built, tmp_path)
    staged_onnx = out / staging_name(ONNX_NAME)
    staged_onnx.mkdir()
    (staged_onnx / ONNX_NAME).write_bytes(b"half an export")
    (out / staging_name(MANIFEST_NAME)).write_bytes(b"{")
    # A user's hidden files that start like our artifacts are not ours: the build once deleted them.
    users = [f".{ONNX_NAME}.abc123.tmp", f".{MANIFEST_NAME}.xyz.tmp", ".transformer.notes", ".timing.cache.old"]
    for name in users:
        (out / name).write_bytes(b"the user's")
    request = build_lib.BuildRequest(
        model="tiny", precision="fp16", out_dir=out, height=64, width=64, text_len=TEXT_LEN, onnx_only=True,
        deleaker_config=KNOBS,
    )
    assert build_lib.build_engines(request).reused_onnx
    assert sorted(p.name for p in out.iterdir()) == sorted([build_lib.BUILD_LOCK_NAME, ONNX_NAME, MANIFEST_NAME, *users])
    assert all((out / name).read_bytes() == b"the user's" for name in users)


def test_engine_directory_onnx_runs_on_the_cpu_only(built, tmp_path):
    with pytest.raises(ConfigError, match="ONNX files run in ONNX Runtime on the CPU"):
        DeLeakerRuntime.from_engines(built, device="cuda", cache_dir=tmp_path)


def _torch_runtime(tiny_components, dtype: torch.dtype) -> DeLeakerRuntime:
    """The torch backend with the transformer's weights rounded to ``dtype`` (what a build in ``dtype`` holds),
    computing in float32."""
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    components["transformer"].to(dtype).to(torch.float32)
    return DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=TEXT_LEN, deleaker_config=KNOBS, default_size=(64, 64)
    )


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_build_output_runs_with_onnx_runtime_and_matches_torch(precision, tiny_components, tmp_path):
    out = tmp_path / "engines"
    build_lib.build_engines(
        build_lib.BuildRequest(
            model="tiny", precision=precision, out_dir=out, height=64, width=64, text_len=TEXT_LEN, onnx_only=True,
            deleaker_config=KNOBS,
        )
    )
    rt = DeLeakerRuntime.from_engines(out, cache_dir=tmp_path / "cache")
    request = GenerationRequest(PROMPT, ENTITIES, seed=5, steps=3)
    got = rt.generate(request, record_latents=True)
    reference = _torch_runtime(tiny_components, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    want = reference.generate(request, record_latents=True)
    plain = reference.generate(dataclasses.replace(request, deleaker=False), record_latents=True)

    assert rt.backend_name == "onnxruntime" and rt.deleaker_config == reference.deleaker_config
    errors = [_relative_error(ours, ref) for ours, ref in zip(got.latents, want.latents)]
    assert len(errors) == 3 and max(errors) < 1e-4
    assert psnr(got.image, want.image) > 40
    # DeLeaker acted, far beyond the backends' difference: the match is not the trivial one.
    assert _relative_error(plain.latents[-1], want.latents[-1]) > 10 * max(errors)


def test_cli_build_then_run_engines_gives_the_torch_image(tiny_components, tmp_path):
    # Knobs given to `build --set` are the engine's: the run matches the torch backend with the same knobs (without
    # smoothing DeLeaker edits the tiny model's attention, so a knob that did not arrive would show).
    knobs = {"k_strength": 5.0, "do_smoothing": False}
    out, image = tmp_path / "engines", tmp_path / "cow.png"
    build = invoke_cli("build", "--model", "tiny", "--precision", "fp16", "--height", "64", "--width", "64",
                    "--text-len", TEXT_LEN, "--out", out, "--onnx-only",
                    "--set", "k_strength=5", "--set", "do_smoothing=false")
    assert build.exit_code == 0, build.output
    (manifest,) = out.glob("*.onnx.manifest.json")
    recorded = json.loads(manifest.read_text())["deleaker_config"]
    assert {name: recorded[name] for name in knobs} == knobs
    run = invoke_cli("run", "--engines", out, "--cache-dir", tmp_path / "cache", "--prompt", PROMPT, "--entities",
                  "cat,cheetah", "--seed", "1", "--steps", "4", "--no-progress", "--out", image)
    assert run.exit_code == 0, run.output
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    components["transformer"].to(torch.float16).to(torch.float32)
    reference = DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=TEXT_LEN, default_size=(64, 64),
        deleaker_config=knobs,
    )
    want = reference(PROMPT, list(ENTITIES), seed=1, steps=4).image
    ours = Image.open(image).convert("RGB")
    default = DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=TEXT_LEN, default_size=(64, 64)
    )
    # Measured (2026-11-27, CPU): inf against the same knobs, 46 dB against the defaults.
    assert psnr(ours, want) > 60 and psnr(ours, default(PROMPT, list(ENTITIES), seed=1, steps=4).image) < 50
