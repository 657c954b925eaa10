"""The one exception type for user mistakes. The CLI prints it as a one-line error and exits 1;
anything else is a bug and keeps its traceback."""


class LMForgeError(Exception):
    """A problem the user can fix: bad input, a missing file, a corrupt checkpoint."""
