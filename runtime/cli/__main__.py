"""``python -m deleaker.runtime.cli``: the same entry point as the ``deleaker-trt`` console script."""

from . import entry_point

entry_point()
