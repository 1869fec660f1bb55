"""Namespaced as `deleaker.plugins`."""
