"""Namespaced as `deleaker.export`."""
