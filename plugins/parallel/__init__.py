"""Builtin parallel plugins."""
