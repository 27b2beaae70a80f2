"""One exception type for problems the user can fix: the CLI prints its message on one line."""


class LowbitError(Exception):
    """Bad input or an unusable environment; the message names the problem and the remedy."""
