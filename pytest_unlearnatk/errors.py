"""Errors meant for people: each message names what is wrong and how to fix it."""


class UnlearnAtkError(Exception):
    """A problem with the user's input (a path, a file, an option); never a bug of ours."""


class MissingSetting(UnlearnAtkError):
    """A run needs a setting it was not given. ``name`` is the setting (a ``run_gate`` keyword and a
    ``RunOptions`` field alike), so each entry point can say how to give it in its own terms."""

    def __init__(self, name: str, need: str, what: str, alternative: str = "") -> None:
        super().__init__(f"{need}: pass {name}={what}{f' ({alternative})' if alternative else ''}")
        self.name, self.need, self.what = name, need, what
