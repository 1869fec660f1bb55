"""deleaker.models: a model argument names the built-in tiny model only as the string "tiny"; a folder named tiny is
a folder."""

from pathlib import Path

import pytest
import torch

from deleaker.errors import ConfigError
from deleaker.models import check_model_source, names_builtin_tiny


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
