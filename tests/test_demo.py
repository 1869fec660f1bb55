"""``deleaker-trt demo`` (`deleaker.runtime.demo`): the Gradio page served on 127.0.0.1 and called through
``gradio_client``, as a user's script would: both images and the overlay equal what `DeLeakerRuntime` and
`mask_overlay` give for the same request; bad input answered with the CLI's message; the command's own checks."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deleaker.runtime import DeLeakerRuntime
from deleaker.runtime.cli import main
from deleaker.runtime.images import mask_overlay
from deleaker.runtime.request import GenerationRequest

gradio = pytest.importorskip("gradio", reason="the demo needs the [demo] extra (gradio)")
gradio_client = pytest.importorskip("gradio_client")

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
# Knobs under which the tiny model's masks survive (see tests/test_entity_masks.py), so the overlay shows them.
KNOBS = {"do_smoothing": False, "std_mul_text": 0.5, "start_aggregating_from": 1, "start_intervention_from": 2}
#: Bound on every call to the page (the tiny model takes a few seconds on 2 CPU cores).
CALL_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runtime(tiny_components):
    return DeLeakerRuntime.from_components(tiny_components, model_id="tiny", backend="torch", text_len=32,
                                           deleaker_config=KNOBS, default_size=(64, 64))


@pytest.fixture(scope="module")
def page(runtime, tmp_path_factory):
    """The page on 127.0.0.1 and a client of it. Gradio keeps served files in GRADIO_TEMP_DIR: a folder of ours."""
    from deleaker.runtime.demo import build_demo

    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(runtime)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, inbrowser=False,
                show_error=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                      download_files=str(tmp_path_factory.mktemp("downloads")))
        yield client
    finally:
        demo.close()
        mp.undo()


def _call(client, *args):
    job = client.submit(*args, api_name="/generate")
    return job.result(timeout=CALL_TIMEOUT_S)


def test_one_request_gives_both_images_and_the_overlay(page, runtime):
    plain_path, deleaker_path, overlay_path = _call(page, PROMPT, "cat, cheetah", 3, 3, 3.5)
    request = GenerationRequest(PROMPT, ["cat", "cheetah"], seed=3, steps=3, guidance=3.5)
    expected = runtime.generate(request)
    plain = runtime.generate(GenerationRequest(PROMPT, ["cat", "cheetah"], seed=3, steps=3, guidance=3.5,
                                               deleaker=False))
    assert expected.entity_masks is not None and bool(expected.entity_masks.any())
    for path, image in ((plain_path, plain.image), (deleaker_path, expected.image),
                        (overlay_path, mask_overlay(expected.image, expected.entity_masks, ["cat", "cheetah"]))):
        with Image.open(path) as got:
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image)), path
    with Image.open(plain_path) as a, Image.open(deleaker_path) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # DeLeaker acted


@pytest.mark.parametrize("entities, steps, message", [
    ("cat, dog", 2, "entities not found in the prompt: ['dog']"),
    ("cat", 2, "at least 2"),
    ("cat, cheetah", 0, "steps"),
])
def test_bad_input_shows_the_clis_message(page, entities, steps, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=None) as error:
        _call(page, PROMPT, entities, 1, steps, 3.5)
    assert message in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--port", 70000], "--port must be an int in [0, 65535]"),
    (["--model", "tiny", "--host", ""], "--host must be an address"),
    (["--model", "/nonexistent/flux"], "/nonexistent/flux"),
    (["--model", "tiny", "--set", "k_strength=0"], "k_strength"),
])
def test_demo_command_refuses_bad_options_before_loading(args, message):
    result = CliRunner().invoke(main, ["demo", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("error:") == 1
