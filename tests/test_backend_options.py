"""deleaker.runtime.backend_options: the one table of torch-only model options, as the CLI's checks
(`RuntimeSpec`) and the library's (`DeLeakerRuntime.from_model`) both read it."""

from __future__ import annotations

import pytest

from deleaker.errors import ConfigError
from deleaker.runtime.backend_options import TORCH_ONLY_OPTIONS, check_backend_options
from deleaker.runtime.jobs import RuntimeSpec
from deleaker.runtime.runtime import check_model_options

VALUES = {"compile": True, "fp8": "row", "offload_encoders": True}


@pytest.mark.parametrize("option", TORCH_ONLY_OPTIONS, ids=lambda o: o.name)
def test_each_torch_only_option_is_refused_elsewhere_by_both_callers_from_one_table(option) -> None:
    given = {option.name: VALUES[option.name]}
    check_backend_options("torch", given)  # taken by the torch backend of a model
    with pytest.raises(ConfigError, match=rf"^{option.name} applies to the torch backend only \({option.purpose}\)"):
        check_model_options("onnxruntime", text_len=16, max_entities=4, dtype=None, **given)
    with pytest.raises(ConfigError, match=rf"^{option.flag} applies to the torch backend of a model .* not to the "
                                          "onnxruntime backend"):
        RuntimeSpec(model="tiny", **given)
    with pytest.raises(ConfigError, match=rf"^{option.flag} applies .* not to an engine directory"):
        check_backend_options("tensorrt", given, engines=True, as_flags=True)


@pytest.mark.parametrize(("options", "message"), [
    ({"compile": "yes"}, "compile must be True or False"),
    ({"offload_encoders": 1}, "offload_encoders must be True or False"),
    ({"fp8": "col"}, r"fp8 scales must be one of \('row', 'tensor'\), got 'col'"),
])
def test_bad_values_get_the_same_message_from_both_callers(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_options("torch", text_len=16, max_entities=4, dtype=None, **options)
    with pytest.raises(ConfigError, match=message):
        RuntimeSpec(model="tiny", backend="torch", **options)
