"""Builtin routers plugins."""
