"""FP8 linears of the PyTorch path (deleaker/fp8_linear.py): scales and quantization against a float reference,
``torch._scaled_mm`` (the CPU build runs it) against the dequantized float64 product, the recipe's layer choice on
the tiny FLUX, and ``--fp8`` through the runtime, verify and the CLI's checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deleaker.errors import ConfigError
from deleaker.fp8_linear import (
    E4M3_MAX,
    Fp8Linear,
    e4m3_scale,
    fp8_linears,
    keeps_precision,
    quantize_e4m3,
    quantize_transformer_fp8,
)

GRANULARITIES = ["tensor", "row"]


def _linear(in_features=64, out_features=48, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight[3] *= 50  # one output channel larger than the others
    return layer.to(dtype)


def test_scales_are_amax_over_448_and_zero_gets_one():
    x = torch.tensor([[1.0, -896.0, 3.0], [0.0, 0.0, 0.0], [0.5, 0.25, -0.125]])
    torch.testing.assert_close(e4m3_scale(x, "tensor"), torch.tensor(896.0 / E4M3_MAX))
    torch.testing.assert_close(e4m3_scale(x, "row"), torch.tensor([[2.0], [1.0 / E4M3_MAX], [0.5 / E4M3_MAX]]))
    assert e4m3_scale(x, "tensor").shape == () and e4m3_scale(x, "row").shape == (3, 1)


def test_quantization_saturates_rounds_to_e4m3_and_keeps_the_largest_value_exact():
    scale = torch.tensor(2.0)
    x = torch.tensor([896.0, -896.0, 2000.0, -1e30, 0.0, 3.0])
    q = quantize_e4m3(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist()[:5] == [448.0, -448.0, 448.0, -448.0, 0.0]  # amax maps to 448 exactly; beyond saturates
    assert q.float()[5] == 1.5  # 3 / 2, representable
    # Round to nearest E4M3 value: relative error at most 2**-4 (3 mantissa bits) in the normal range.
    y = torch.linspace(0.02, 440.0, 1000)
    err = (quantize_e4m3(y, torch.tensor(1.0)).float() - y).abs() / y
    assert float(err.max()) <= 2**-4 + 1e-7


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fp8_linear_equals_the_dequantized_float_reference(granularity, dtype):
    layer = _linear(dtype=dtype)
    fp8 = Fp8Linear(layer, granularity)
    x = torch.randn(2, 5, 64).to(dtype)
    x[0, 1] *= 30  # one token larger than the others
    with torch.no_grad():
        got = fp8(x)
    assert got.dtype == dtype and got.shape == (2, 5, 48)

    # Reference: the same scaling logic spelled out in float64 (quantize, dequantize, matmul, bias).
    w = layer.weight.detach().double()
    rows = x.reshape(-1, 64).double()
    if granularity == "tensor":
        w_scale, x_scale = w.abs().max() / 448, rows.abs().max() / 448
    else:
        w_scale, x_scale = w.abs().amax(1, keepdim=True) / 448, rows.abs().amax(1, keepdim=True) / 448
    wq = (w / w_scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * w_scale
    xq = (rows / x_scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * x_scale
    want = (xq @ wq.T + layer.bias.detach().double()).reshape(2, 5, 48)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # float32 accumulation; bf16 output rounding
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * float(want.abs().max()))

    # And close to the unquantized layer on ordinary inputs: E4M3 keeps about 2 significant digits.
    x = torch.randn(4, 64).to(dtype)
    with torch.no_grad():
        exact, approx = layer(x).double(), fp8(x).double()
    rel = float((approx - exact).norm() / exact.norm())
    assert rel < 0.1, rel  # each operand within 2**-4 relative (3 mantissa bits): products within about 10%


def test_row_scales_beat_tensor_scales_on_an_extreme_outlier_channel():
    # E4M3 is a float format: one scale serves values within its range (about 448 / 2**-6 = 28672x). An output
    # channel 1e5x larger pushes the others into E4M3's subnormals under one per-tensor scale; row-wise keeps them.
    layer = _linear()
    with torch.no_grad():
        layer.weight[3] *= 2000  # 50 * 2000 = 1e5
    x = torch.randn(16, 64)
    with torch.no_grad():
        exact = layer(x)
        keep = torch.arange(48) != 3  # the other channels
        errors = {
            g: float((Fp8Linear(layer, g)(x) - exact)[:, keep].norm() / exact[:, keep].norm()) for g in GRANULARITIES
        }
    assert errors["row"] < 0.06 < errors["tensor"], errors


def test_bad_granularity_is_refused():
    with pytest.raises(ConfigError, match=r"FP8 scales must be one of \('tensor', 'row'\)"):
        Fp8Linear(_linear(), "column")


def test_recipe_on_the_tiny_flux_keeps_embedders_norms_and_output_projection(tiny_components):
    transformer = copy.deepcopy(tiny_components["transformer"]).eval()
    chosen = fp8_linears(transformer)
    kept = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    assert "transformer_blocks.0.attn.to_q" in chosen and "single_transformer_blocks.0.proj_mlp" in chosen
    assert "single_transformer_blocks.0.proj_out" in chosen  # a block's projection, not the model's output
    for name in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
                 "single_transformer_blocks.0.norm.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert name in kept and keeps_precision(name), name
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 0.5), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
        guidance=torch.full((1,), 3.5) if cfg.guidance_embeds else None, return_dict=False,
    )
    with torch.no_grad():
        want = transformer(**inputs)[0]
        assert quantize_transformer_fp8(transformer, "row") == len(chosen)
        got = transformer(**inputs)[0]
    assert sum(isinstance(m, Fp8Linear) for m in transformer.modules()) == len(chosen)
    assert float((got - want).norm() / want.norm()) < 0.05


def test_fp8_runtime_verifies_against_the_unquantized_torch_backend():
    from deleaker.runtime.jobs import RuntimeSpec, VerifyJob, output_record, verify
    from deleaker.runtime.request import GenerationRequest

    overrides = (("do_smoothing", False), ("start_intervention_from", 2), ("std_mul_text", 0.5))
    spec = RuntimeSpec(model="tiny", backend="torch", device="cpu", text_len=32, fp8="row",
                       deleaker_overrides=overrides)
    request = GenerationRequest("A cat and a cheetah in a river", ("cat", "cheetah"), seed=1, steps=3)
    candidate = spec.open()
    report = verify(VerifyJob(spec, request), candidate=candidate)
    assert report.backend == "torch fp8-row" and report.passed, report.failures
    # FP8 changed the numbers (the comparison is not of a model with itself), within the default tolerance.
    assert 0 < report.max_step_rel_err < 1e-2 and report.psnr_db >= 30
    assert output_record(candidate, candidate.resolve(request))["fp8"] == "row"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "tiny", "fp8": "row"}, "--fp8 applies to the torch backend of a model"),
        ({"model": "tiny", "backend": "torch", "fp8": "col"}, "fp8 scales must be one of"),
    ],
    ids=["onnxruntime", "bad-scales"],
)
def test_fp8_options_are_refused_before_any_work(kwargs, message, monkeypatch):
    from deleaker.runtime import runtime as runtime_mod
    from deleaker.runtime.jobs import RuntimeSpec
    from deleaker.runtime.runtime import DeLeakerRuntime

    with pytest.raises(ConfigError, match=message):
        RuntimeSpec(**kwargs)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(runtime_mod, "load_components", no_loading)
    backend = kwargs.get("backend", "onnxruntime")
    with pytest.raises(ConfigError, match="(?i)fp8"):
        DeLeakerRuntime.from_model("tiny", backend=backend, device="cpu", fp8=kwargs["fp8"])
