"""Builtin data plugins."""
