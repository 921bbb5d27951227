"""This package's router against rapid's router contract (the same tests rapid runs on its own)."""

from rapid.builtin.contract import *  # noqa: F401,F403

ROUTERS = ["modulo"]
