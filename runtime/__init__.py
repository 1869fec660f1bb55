"""Namespaced as `deleaker.runtime`."""
