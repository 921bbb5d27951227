"""The one exception type that reaches users: a message, a hint, exit code 2."""


class UserError(Exception):
    """Bad input from the user (recipe, CLI, files). The CLI prints it as one line plus a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def unknown_name(kind: str, name: str, valid) -> UserError:
    """The error for a name that is not registered, listing the valid ones."""
    valid = sorted(valid)
    return UserError(
        f"unknown {kind} {name!r}; valid: {', '.join(valid) if valid else '(none registered)'}",
        hint="`rapid plugins` lists every registered name",
    )
