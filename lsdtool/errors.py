"""The one exception type for expected failures; the CLI prints its message as one line, exit 1."""


class LsdError(Exception):
    """Bad input or an unmet precondition, described in one sentence."""
