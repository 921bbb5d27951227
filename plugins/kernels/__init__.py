"""Builtin kernels plugins."""
