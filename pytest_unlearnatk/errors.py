"""Errors meant for people: each message names what is wrong and how to fix it."""


class UnlearnAtkError(Exception):
    """A problem with the user's input (a path, a file, an option); never a bug of ours."""
