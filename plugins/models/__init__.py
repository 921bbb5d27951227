"""Builtin model plugins."""
