"""Errors meant for people: each message names what is wrong and how to fix it."""


class UnlearnAtkError(Exception):
    """A problem with the user's input (a path, a file, an option); never a bug of ours."""


class SettingProblem(UnlearnAtkError):
    """A setting is missing or does not work (a store directory that cannot be written). ``name`` is
    the setting (a ``run_gate`` keyword and a ``RunOptions`` field alike), so each entry point can
    say how to give it in its own terms: ``name=...`` in Python, ``--unlearn-name=...`` in pytest."""

    def __init__(self, name: str, need: str, what: str, alternative: str = "") -> None:
        super().__init__(f"{need}: pass {name}={what}{f' ({alternative})' if alternative else ''}")
        self.name, self.need, self.what = name, need, what

    def as_option(self, flag: str, ini: str) -> str:
        """The message for a command line: how to give the setting as ``flag`` or the ini key ``ini``."""
        return f"{self.need}: pass {flag}={self.what}, or set {ini} in your pytest ini file"
