"""``torch.ops.deleaker.attention`` (deleaker/library.py): a custom op the compiler traces, with kernels per device.

- the fake (meta) implementation agrees with the real one (``torch.library.opcheck``);
- ``torch._dynamo.explain`` finds zero graph breaks in the tiny FLUX transformer with DeLeaker on and off;
- the core never imports the plugins package; importing ``deleaker.plugins.torch_op`` registers the CUDA kernel
  onto the op (PyTorch's dispatcher picks it, no Python device test), and that kernel runs the reference for inputs
  the fused kernels cannot take (here: CPU tensors, no kernel library).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from deleaker import DeLeakerConfig, deleaker_attention, deleaker_attention_reference
from deleaker.library import KNOB_NAMES, call_attention, config_from_knobs, config_kwargs
from deleaker.processor import DeLeakerState, install_deleaker_processors

GRID = (3, 4)
TEXT_LEN = 6
# A window that covers the first blocks, no smoothing: random inputs form masks and the edits happen.
CONFIG = DeLeakerConfig(
    do_smoothing=False,
    start_aggregating_from=0,
    stop_aggregating_at=9,
    start_intervention_from=1,
    stop_intervention_at=40,
    std_mul_text=0.5,
    std_mul_image_image=0.5,
)


def _op_inputs(batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = TEXT_LEN + GRID[0] * GRID[1]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g) for _ in range(3))
    mask = torch.zeros(3, TEXT_LEN, dtype=torch.bool)
    mask[0, 1], mask[1, 3:5] = True, True
    history = torch.rand(batch, 3, GRID[0] * GRID[1], generator=g)
    return q, k, v, mask, history



def _runs_ok_in_a_fresh_python(script: str, *, timeout: int) -> None:
    """``script`` run by a new interpreter (nothing imported yet) exits 0 and prints ``ok`` last."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

def test_knob_order_is_the_configs():
    assert config_from_knobs(*config_kwargs(CONFIG).values()) == CONFIG
    assert KNOB_NAMES == tuple(config_kwargs(CONFIG))


@pytest.mark.parametrize("step", [0, 3], ids=["outside", "inside"])
def test_opcheck_fake_matches_the_kernel(step):
    q, k, v, mask, history = _op_inputs()
    args = (q, k, v, mask, history, torch.tensor(step, dtype=torch.int64), 1, 2, *GRID, *config_kwargs(CONFIG).values())
    # Schema, fake tensor (meta shapes) and dispatcher checks; no autograd: the op is inference-only.
    torch.library.opcheck(
        torch.ops.deleaker.attention.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_functional_op_goes_through_the_custom_op_and_equals_the_reference():
    q, k, v, mask, history = _op_inputs()
    for block_step in (0, 5, torch.tensor(5), torch.tensor([7], dtype=torch.int32)):
        got = deleaker_attention(q, k, v, mask, grid=GRID, block_step=block_step, history=history, config=CONFIG)
        want = deleaker_attention_reference(
            q, k, v, mask, grid=GRID, block_step=block_step, history=history, config=CONFIG
        )
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A step inside the window changed the output: the comparison above covered the edits.
    plain, _ = deleaker_attention(q, k, v, mask, grid=GRID, block_step=0, history=history, config=CONFIG)
    edited, _ = deleaker_attention(q, k, v, mask, grid=GRID, block_step=5, history=history, config=CONFIG)
    assert not torch.equal(plain, edited)


def test_op_under_torch_compile_equals_eager():
    q, k, v, mask, history = _op_inputs()
    step = torch.tensor(2, dtype=torch.int64)

    def fn(q, k, v, history, step):
        out, new_history = call_attention(q, k, v, mask, history, step, block_offset=1, num_blocks=2, grid=GRID,
                                          config=CONFIG)
        return out * 2, new_history + 1  # work around the op for the compiler to fuse

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(q, k, v, history, step), fn(q, k, v, history, step)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _transformer_call(components):
    transformer = copy.deepcopy(components["transformer"]).eval()
    num_blocks = install_deleaker_processors(transformer)
    cfg = transformer.config
    gh, gw = 4, 6
    text_len = 16
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, gh * gw, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 0.7),
        guidance=torch.full((1,), 3.5) if cfg.guidance_embeds else None,
        txt_ids=torch.zeros(text_len, 3),
        img_ids=torch.zeros(gh * gw, 3),
        return_dict=False,
    )
    mask = torch.zeros(4, text_len, dtype=torch.bool)
    mask[0, 2], mask[1, 5:7] = True, True
    state = DeLeakerState(
        entity_mask=mask,
        grid=(gh, gw),
        config=DeLeakerConfig.resolve(CONFIG, num_blocks),
        history=torch.zeros(1, 4, gh * gw),
    )
    return transformer, inputs, state


@pytest.mark.parametrize("deleaker_on", [True, False], ids=["deleaker-on", "deleaker-off"])
def test_tiny_flux_transformer_traces_without_graph_breaks(tiny_components, deleaker_on):
    transformer, inputs, state = _transformer_call(tiny_components)

    def step(inputs, state):
        kwargs = {"deleaker_state": state} if deleaker_on else None
        return transformer(**inputs, joint_attention_kwargs=kwargs)[0]

    with torch.no_grad():
        explained = torch._dynamo.explain(step)(inputs, state)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [node.target for graph in explained.graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert (torch.ops.deleaker.attention.default in ops or torch.ops.deleaker.attention in ops) == deleaker_on


def test_core_does_not_import_the_plugins_and_the_plugins_register_the_cuda_kernel():
    script = (
        "import sys, torch\n"
        "import deleaker.library, deleaker.ops, deleaker.processor, deleaker.pipeline\n"
        "assert not [m for m in sys.modules if m.startswith('deleaker.plugins')], sorted(sys.modules)\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "assert not has('deleaker::attention', 'CUDA')\n"
        "import deleaker.plugins.torch_op\n"
        "assert has('deleaker::attention', 'CUDA')\n"
        "print('ok')\n"
    )
    _runs_ok_in_a_fresh_python(script, timeout=300)


def test_cuda_kernel_runs_the_reference_for_inputs_the_kernels_cannot_take():
    from deleaker.plugins import torch_op

    q, k, v, mask, history = _op_inputs()
    step = torch.tensor(2, dtype=torch.int64)
    knobs = tuple(config_kwargs(CONFIG).values())
    got = torch_op.cuda_kernel(q, k, v, mask, history, step, 1, 2, *GRID, *knobs)
    want = deleaker_attention_reference(q, k, v, mask, grid=GRID, block_step=5, history=history, config=CONFIG)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernel_providers_come_from_the_entry_point_group_and_load_only_off_the_cpu():
    """The core finds the CUDA kernel through the ``deleaker.kernels`` entry points (pyproject.toml), so a pipeline
    on a GPU gets it without importing the plugins; a CPU call never loads a provider."""
    from importlib.metadata import entry_points

    from deleaker.library import KERNEL_PROVIDERS_GROUP

    assert {entry.value for entry in entry_points(group=KERNEL_PROVIDERS_GROUP)} == {"deleaker.plugins.torch_op"}
    script = (
        "import sys, torch\n"
        "from deleaker import DeLeakerConfig, deleaker_attention\n"
        "from deleaker.library import load_kernel_providers\n"
        "q = k = v = torch.randn(1, 1, 4 + 4, 8)\n"
        "mask = torch.zeros(2, 4, dtype=torch.bool); mask[0, 1] = mask[1, 2] = True\n"
        "deleaker_attention(q, k, v, mask, grid=(2, 2), block_step=3, history=None, config=DeLeakerConfig())\n"
        "assert 'deleaker.plugins.torch_op' not in sys.modules\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "assert load_kernel_providers() is True and load_kernel_providers() is False\n"
        "assert 'deleaker.plugins.torch_op' in sys.modules and has('deleaker::attention', 'CUDA')\n"
        "print('ok')\n"
    )
    _runs_ok_in_a_fresh_python(script, timeout=300)


@pytest.mark.gpu
def test_first_cuda_call_loads_the_fused_kernels_and_takes_them():
    """On a GPU, the first call of the core's `deleaker_attention` (as `DeLeakerFluxPipeline` makes it) loads the
    provider and is served by the CUDA kernel, which gives what the plugins' fast path gives."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    script = (
        "import sys, torch\n"
        "from deleaker import DeLeakerConfig, deleaker_attention\n"
        "g = torch.Generator(device='cuda').manual_seed(0)\n"
        "shape = (1, 2, 8 + 64, 64)\n"
        "q, k, v = (torch.randn(shape, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(3))\n"
        "mask = torch.zeros(2, 8, dtype=torch.bool, device='cuda'); mask[0, 1] = mask[1, 3] = True\n"
        "cfg = DeLeakerConfig(do_smoothing=False)\n"
        "got = deleaker_attention(q, k, v, mask, grid=(8, 8), block_step=40, history=None, config=cfg)\n"
        "assert 'deleaker.plugins.torch_op' in sys.modules\n"
        "from deleaker.library import config_kwargs\n"
        "from deleaker.plugins import torch_op\n"
        "want = torch_op.cuda_kernel(q, k, v, mask, torch.zeros(1, 2, 64, device='cuda'),\n"
        "    torch.tensor(40), 0, 1, 8, 8, *config_kwargs(cfg).values())\n"
        "assert all(torch.equal(a, b) for a, b in zip(got, want))\n"
        "print('ok')\n"
    )
    _runs_ok_in_a_fresh_python(script, timeout=600)
