"""The one exception type that means "the user's input or environment is wrong"."""


class OxQuantError(Exception):
    """A problem with the user's input or environment.

    The CLI reports it as one line on stderr and exits with code 1. Anything else
    that escapes is a bug in ox-quant and is shown with its traceback.
    """


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with every whitespace run collapsed to one space, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
