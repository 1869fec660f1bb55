"""`deleaker.models`: loading the model a runtime or a build starts from, and the key of its weights.

A model argument names the built-in tiny model only as the string "tiny"; a folder named tiny is a folder. A
folder's transformer is identified by its files' names, sizes and times (no weight byte read); a runtime computes the
key once, and a cache hit from a folder never hashes the weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from deleaker import models
from deleaker.errors import ConfigError
from deleaker.models import check_model_source, names_builtin_tiny
from deleaker.runtime import model_loading as model_loading_mod
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest
from deleaker.tiny import save_tiny_flux


def test_only_the_string_names_the_built_in_model(tmp_path, monkeypatch):
    from deleaker import models, tiny

    assert models.TINY_MODEL_NAME == tiny.TINY_MODEL_NAME
    monkeypatch.chdir(tmp_path)
    assert names_builtin_tiny("tiny")
    assert not names_builtin_tiny(Path("tiny")) and not names_builtin_tiny("./tiny") and not names_builtin_tiny("Tiny")
    (tmp_path / "tiny").mkdir()  # a folder that is no model does not make the name ambiguous
    assert names_builtin_tiny("tiny")
    with pytest.raises(ConfigError, match="neither 'tiny' nor a directory"):
        check_model_source(Path("elsewhere"))


def test_the_name_is_refused_where_a_tiny_model_folder_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ConfigError, match=r"./tiny here is a model folder: pass ./tiny"):
        check_model_source("tiny")
    check_model_source(Path("tiny"))  # the folder: fine


def test_a_folder_named_tiny_loads_that_folder_not_random_weights(tmp_path, monkeypatch):
    """`DeLeakerRuntime.from_model(Path("tiny"))` built the random tiny model although ./tiny/model_index.json was
    there (the check compared str(model) == "tiny")."""
    from deleaker.models import load_components
    from deleaker.tiny import save_tiny_flux

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    save_tiny_flux(tmp_path / "tiny", seed=3)  # other weights than the built-in model's (seed 0)
    components, model_id = load_components(Path("tiny"))
    assert model_id == str((tmp_path / "tiny").resolve())
    monkeypatch.chdir(tmp_path / "tiny")  # elsewhere: "tiny" is the built-in model again
    reference, reference_id = load_components("tiny")
    assert reference_id == "tiny"
    ours, theirs = components["transformer"].state_dict(), reference["transformer"].state_dict()
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_empty_folder_named_tiny_is_refused_not_replaced(tmp_path, monkeypatch):
    from deleaker.runtime.runtime import DeLeakerRuntime

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(ConfigError, match="is not a diffusers model folder"):
        DeLeakerRuntime.from_model(Path("tiny"))


def _fake_model(root: Path, weight_bytes: int = 2**30) -> Path:
    """A diffusers-like folder whose transformer holds a sparse file of ``weight_bytes`` (the fake 1 GB model)."""
    transformer = root / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text('{"num_layers": 19}')
    with open(transformer / "diffusion_pytorch_model.safetensors", "wb") as weights:
        weights.truncate(weight_bytes)
    return root


def test_a_folder_is_identified_by_its_files_without_reading_them(tmp_path):
    model = _fake_model(tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    started = time.perf_counter()
    key = models.folder_fingerprint(model)
    assert key is not None and len(key) == 64 and time.perf_counter() - started < 1.0  # 1 GiB is not read
    assert models.folder_fingerprint(model) == key
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten in place: another time
    touched = models.folder_fingerprint(model)
    assert touched != key
    with open(weights, "r+b") as handle:
        handle.truncate(2**30 + 1)
    assert models.folder_fingerprint(model) not in (key, touched)
    (model / "transformer" / "extra.safetensors").write_bytes(b"x")
    assert models.folder_fingerprint(model) is not None


@pytest.mark.parametrize("model", ["tiny", "no-transformer-folder"])
def test_without_a_transformer_folder_there_is_no_folder_key(tmp_path, model):
    assert models.folder_fingerprint(model if model == "tiny" else tmp_path) is None


def test_a_runtime_from_a_folder_reuses_its_export_without_hashing_the_weights(tmp_path, monkeypatch):
    folder = save_tiny_flux(tmp_path / "model")
    cache = tmp_path / "cache"
    request = GenerationRequest("A cat and a dog", ("cat", "dog"), seed=1, steps=1, height=64, width=64)
    first = DeLeakerRuntime.from_model(folder, text_len=16, cache_dir=cache).generate(request)
    (entry,) = [p for p in (cache / "onnx").iterdir() if p.is_dir() and not p.name.startswith(".")]

    hashed = []
    real_hash = model_loading_mod.transformer_sha256
    monkeypatch.setattr(model_loading_mod, "transformer_sha256", lambda t: hashed.append(t) or real_hash(t))
    again = DeLeakerRuntime.from_model(folder, text_len=16, cache_dir=cache).generate(request)
    assert hashed == [] and again.image.tobytes() == first.image.tobytes()
    assert [p for p in (cache / "onnx").iterdir() if p.is_dir() and not p.name.startswith(".")] == [entry]

    # A changed weights file is another model: a new export, never the old entry.
    weights = next((folder / "transformer").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    DeLeakerRuntime.from_model(folder, text_len=16, cache_dir=cache).prepare(request)
    assert len([p for p in (cache / "onnx").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2


def test_in_memory_components_are_hashed_once_per_runtime(tiny_components, tmp_path, monkeypatch):
    import copy

    hashed = []
    real_hash = model_loading_mod.transformer_sha256
    monkeypatch.setattr(model_loading_mod, "transformer_sha256", lambda t: hashed.append(t) or real_hash(t))
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    rt = DeLeakerRuntime.from_components(components, model_id="tiny", text_len=16, cache_dir=tmp_path)
    for side in (64, 128):
        rt.prepare(GenerationRequest("A cat and a dog", ("cat", "dog"), steps=1, height=side, width=side))
    assert len(hashed) == 1
