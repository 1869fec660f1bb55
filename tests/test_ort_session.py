"""`deleaker.export.ort_session`: plain ONNX Runtime sessions refuse graphs with the custom node."""

from __future__ import annotations


import pytest

from deleaker.errors import DeLeakerError
from deleaker.export.ort_session import make_session

from hostile_use import node_graph


def test_onnx_runtime_sessions_refuse_the_custom_node(tmp_path):
    with pytest.raises(DeLeakerError, match="has deleaker::DeLeakerAttention nodes"):
        make_session(node_graph(tmp_path))
