"""The one exception type every user-facing failure derives from: the CLI prints its message on one line."""


class DigitlabError(Exception):
    """A problem with the user's input or environment, with a one-line message naming what is wrong."""

    exit_code = 1
