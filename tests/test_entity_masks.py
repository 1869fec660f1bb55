"""The entity masks a generation reports (`GenerationResult.entity_masks`, `deleaker.runtime.entity_masks`) are the
masks DeLeaker's last intervening block computed, and `run --save-masks` draws them over the image
(`deleaker.runtime.images.mask_overlay`).

The masks the op computes are observed with a spy around the real `deleaker.ops.entity_image_masks` (it records
what the real function returns, it changes nothing), on the tiny model with the torch backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import deleaker.ops
from deleaker.config import DeLeakerConfig
from deleaker.runtime import DeLeakerRuntime
from deleaker.runtime.cli import main
from deleaker.runtime.entity_masks import mask_step
from deleaker.runtime.images import ENTITY_COLOURS, mask_overlay, read_png_record

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
ENTITIES = ["cat", "cheetah"]
# The tiny model has 4 joint blocks per step. Without smoothing its scattered entity maps survive as masks, and a
# low text threshold makes them larger.
KNOBS = {"do_smoothing": False, "std_mul_text": 0.5, "start_aggregating_from": 1, "start_intervention_from": 2}


@pytest.fixture(scope="module")
def runtime(tiny_components):
    return DeLeakerRuntime.from_components(tiny_components, model_id="tiny", backend="torch", text_len=32,
                                           deleaker_config=KNOBS, default_size=(64, 64))


class MaskSpy:
    """Records ``(block_step, masks)`` of every call of the real `entity_image_masks` made by the op."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, torch.Tensor]] = []
        real = deleaker.ops.entity_image_masks
        spy = self

        def recording(source, present, grid, config):
            masks = real(source, present, grid, config)
            spy.calls.append((spy.block_step, masks.clone()))
            return masks

        real_reference = deleaker.ops._reference

        def reference(*args, block_step, **kwargs):
            spy.block_step = int(block_step)
            return real_reference(*args, block_step=block_step, **kwargs)

        monkeypatch.setattr(deleaker.ops, "entity_image_masks", recording)
        monkeypatch.setattr(deleaker.ops, "_reference", reference)

    def last_intervening(self, config: DeLeakerConfig) -> torch.Tensor:
        inside = [(t, m) for t, m in self.calls if config.intervenes_at(t)]
        return inside[-1][1]


def test_mask_step_rules():
    tiny = DeLeakerConfig.for_model(4, **KNOBS)
    # 3 steps of 4 blocks: the last block (t = 11) intervenes (the scaled windows end at 48 and 80 block steps)
    # and is the end of step 2, so that step's history is what its masks came from.
    assert mask_step(tiny, 4, 3) == 2
    # The window is not reached: DeLeaker never acted.
    assert mask_step(DeLeakerConfig.for_model(4, start_intervention_from=20), 4, 3) is None
    # Without history the masks come from a block's own affinities, which nothing returns.
    assert mask_step(DeLeakerConfig.for_model(4, use_history=False), 4, 3) is None
    # Intervention stops inside step 1 (t = 5) while blocks 6 and 7 of that step still aggregate: the history the
    # loop sees is not the one the last masks came from.
    assert mask_step(DeLeakerConfig.for_model(4, **{**KNOBS, "stop_intervention_at": 5}), 4, 3) is None
    # ... but when intervention stops at the end of a step, that step's history is exact, later steps aside.
    assert mask_step(DeLeakerConfig.for_model(4, **{**KNOBS, "stop_intervention_at": 7}), 4, 3) == 1
    # ... and when aggregation stopped first, any block is exact.
    frozen = {**KNOBS, "stop_aggregating_at": 4, "stop_intervention_at": 5}
    assert mask_step(DeLeakerConfig.for_model(4, **frozen), 4, 3) == 1
    # The last intervening block is the first aggregating one: its masks are the history (= its affinities).
    assert mask_step(DeLeakerConfig.for_model(4, start_aggregating_from=3, start_intervention_from=3,
                                              stop_intervention_at=3), 4, 1) == 0


def test_result_masks_are_the_last_intervening_blocks(runtime, monkeypatch):
    spy = MaskSpy(monkeypatch)
    result = runtime(PROMPT, ENTITIES, seed=3, steps=3)
    config = DeLeakerConfig(**runtime.deleaker_config)
    expected = spy.last_intervening(config)[0, : len(ENTITIES)].reshape(len(ENTITIES), 8, 8)
    assert result.entity_masks is not None
    assert result.entity_masks.dtype == torch.bool and result.entity_masks.shape == (2, 8, 8)
    assert torch.equal(result.entity_masks, expected)
    assert 0 < int(result.entity_masks.sum()) < result.entity_masks.numel()  # masks that say something


def test_masks_when_intervention_stops_early(tiny_components, monkeypatch):
    knobs = {**KNOBS, "stop_intervention_at": 7}  # ends with step 1 of 3; aggregation goes on after it
    rt = DeLeakerRuntime.from_components(tiny_components, model_id="tiny", backend="torch", text_len=32,
                                         deleaker_config=knobs, default_size=(64, 64))
    spy = MaskSpy(monkeypatch)
    result = rt(PROMPT, ENTITIES, seed=3, steps=3)
    expected = spy.last_intervening(DeLeakerConfig(**rt.deleaker_config))[0, :2].reshape(2, 8, 8)
    assert torch.equal(result.entity_masks, expected)


def test_no_masks_without_deleaker(runtime):
    assert runtime(PROMPT, ENTITIES, seed=3, steps=2, deleaker=False).entity_masks is None


def test_overlay_colours_each_mask():
    image = Image.new("RGB", (16, 8), (0, 0, 0))
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, 0, 0] = True  # the top-left 4x4 pixels
    masks[1, 1, 3] = True  # the bottom-right 4x4 pixels
    overlay = np.asarray(mask_overlay(image, masks, ["cat", "dog"]))
    assert overlay.shape[1] == 160 and overlay.shape[0] > 8  # legend below, at least 160 pixels wide
    first = np.rint(np.asarray(ENTITY_COLOURS[0]) * 0.5)
    second = np.rint(np.asarray(ENTITY_COLOURS[1]) * 0.5)
    assert (overlay[:4, :4] == first).all() and (overlay[4:8, 12:16] == second).all()
    assert (overlay[4:8, :12] == 0).all() and (overlay[:4, 4:16] == 0).all()
    with pytest.raises(ValueError, match="masks must be"):
        mask_overlay(image, masks[:1], ["cat", "dog"])
    # No masks: the image, untouched, with a legend saying so.
    assert (np.asarray(mask_overlay(image, None, ["cat", "dog"]))[:8, :16] == 0).all()


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _knob_options():
    return [x for name, value in KNOBS.items() for x in ("--set", f"{name}={str(value).lower()}")]


def test_run_save_masks_writes_the_overlay(runtime, tmp_path):
    out = tmp_path / "cat.png"
    result = _cli("run", "--model", "tiny", "--backend", "torch", "--text-len", 32, "--steps", 3, "--seed", 3,
                  "--no-progress", *_knob_options(), "--prompt", PROMPT, "--entities", "cat,cheetah",
                  "--save-masks", "--out", out)
    assert result.exit_code == 0, result.output
    masks_png = tmp_path / "cat_masks.png"
    assert f"masks {masks_png}" in result.output
    expected = runtime(PROMPT, ENTITIES, seed=3, steps=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.image))
    overlay = mask_overlay(expected.image, expected.entity_masks, ENTITIES)
    assert np.array_equal(np.asarray(Image.open(masks_png).convert("RGB")), np.asarray(overlay))
    assert read_png_record(masks_png)[1]["entities"] == ENTITIES


def test_run_save_masks_bad_output_writes_nothing(tmp_path):
    (tmp_path / "cat_masks.png").mkdir()  # a directory where the overlay would go
    out = tmp_path / "cat.png"
    result = _cli("run", "--model", "tiny", "--backend", "torch", "--steps", 1, "--no-progress", "--prompt", PROMPT,
                  "--entities", "cat,cheetah", "--save-masks", "--out", out)
    assert result.exit_code == 1
    assert "cat_masks.png is a directory" in result.output
    assert not out.exists()
