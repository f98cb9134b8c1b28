"""The harness's one error type: bad input from the command line, reported without a traceback."""


class UsageError(ValueError):
    """A command-line argument or result directory the harness cannot use; the message names it."""
