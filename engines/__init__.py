"""Namespaced as `deleaker.engines`."""
