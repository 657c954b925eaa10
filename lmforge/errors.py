"""The one exception type for user mistakes. The CLI prints it as a one-line error and exits 1;
anything else is a bug and keeps its traceback."""


class LMForgeError(Exception):
    """A problem the user can fix: bad input, a missing file, a corrupt checkpoint."""


class TruncatedOutput(LMForgeError):
    """Constrained output that ran out of tokens (or hit a stop) before the specification was
    complete: never returned as if it were valid. `text` holds what was generated."""

    def __init__(self, message: str, text: str = ""):
        super().__init__(message)
        self.text = text
