"""The strict JSON reader every user-given JSON goes through (prompts lines, manifests, ONNX metadata)."""

import json

import pytest

from deleaker.errors import DeLeakerError
from deleaker.jsonio import StrictJSONError, loads_strict


def test_reads_what_json_reads():
    text = '{"prompt": "a cat", "entities": ["cat", "dog"], "seed": 3, "nested": [{"a": 1}, {"a": 2}], "x": null}'
    assert loads_strict(text) == json.loads(text)
    assert loads_strict(b'[1, 2.5, "s", true]') == [1, 2.5, "s", True]


@pytest.mark.parametrize(
    "text, key",
    [('{"seed": 1, "seed": 2}', "seed"), ('{"a": {"b": 1, "b": 1}}', "b"), ('[{"c": 1}, {"c": 1, "c": 2}]', "c")],
)
def test_refuses_a_key_given_twice_at_any_depth(text, key):
    with pytest.raises(StrictJSONError, match=f"duplicate key '{key}'"):
        loads_strict(text)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_refuses_non_standard_constants_on_request(constant):
    with pytest.raises(StrictJSONError, match="is not JSON"):
        loads_strict(f'{{"guidance": {constant}}}', allow_nan=False)
    assert loads_strict(f'{{"guidance": {constant}}}')["guidance"] != 0  # read; the caller's checks refuse it


def test_errors_stay_value_errors():
    """Callers that turned bad JSON into their own error through ``except ValueError`` keep doing so."""
    assert issubclass(StrictJSONError, ValueError)
    with pytest.raises(json.JSONDecodeError):
        loads_strict("{")


def test_every_user_json_reader_refuses_a_duplicate_key():
    """The readers of what users hand us go through the strict loader: a prompts line, an HTTP request body, an
    engine manifest (each once kept the last value silently)."""
    from deleaker.engines.manifest import EngineManifest, ManifestError
    from deleaker.runtime.jobs import BatchFileError, parse_prompts_line
    from deleaker.runtime.serving_api import parse_generate_body

    line = b'{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1, "seed": 2}'
    with pytest.raises(BatchFileError, match="duplicate key 'seed'"):
        parse_prompts_line(line, "line 1", first=True)
    with pytest.raises(DeLeakerError, match="duplicate key 'seed'"):
        parse_generate_body(line)
    with pytest.raises(ManifestError, match="duplicate key 'format'"):
        EngineManifest.from_json('{"format": 1, "format": 1}')
