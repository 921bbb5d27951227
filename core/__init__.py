"""rapid: a minimal, pluggable framework for training sparse Mixture-of-Experts GPT models."""

import pluggy

hookimpl = pluggy.HookimplMarker("rapid")

from rapid.errors import UserError  # noqa: E402

__all__ = ["hookimpl", "UserError"]
__version__ = "0.1.0"
