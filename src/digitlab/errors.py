"""The one exception type every user-facing failure derives from (the CLI prints its message on one line), and
how a library's exception is quoted inside such a line (`first_line`)."""


class DigitlabError(Exception):
    """A problem with the user's input or environment, with a one-line message naming what is wrong."""

    exit_code = 1


def message_lines(exc: BaseException) -> list[str]:
    """The non-empty lines of an exception's message, stripped (never raises, even when str(exc) does)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error being reported
        text = ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, at most `limit` characters, else its class name
    (for an empty message); never raises. How digitlab quotes a library's error inside its own one-line one."""
    lines = message_lines(exc)
    return lines[0][:limit] if lines else exc.__class__.__name__
