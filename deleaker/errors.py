"""Typed errors. Library code raises these; only the CLI prints them and exits."""


class DeLeakerError(Exception):
    """Base class of every error deleaker-trt raises on purpose."""


class ConfigError(DeLeakerError, ValueError):
    """A DeLeaker option has a wrong type or value."""


class ShapeError(DeLeakerError, ValueError):
    """A tensor has the wrong shape, dtype or device for the op."""


class EntityError(DeLeakerError, ValueError):
    """The entities do not fit the prompt (not found, duplicated, overlapping, too few or too many)."""
