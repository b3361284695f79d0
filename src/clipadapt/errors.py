"""The one exception type users see: one line naming the file or value and what was expected."""


class ClipAdaptError(Exception):
    """A user-facing error. The CLI prints ``clipadapt: error: <message>`` and exits 2."""


class ClipAdaptWarning(UserWarning):
    """Something the user should know (a fallback taken, an option deprecated). The CLI prints
    each as one line, ``clipadapt: warning: <message>``; library users get a normal warning."""


def warn(message: str) -> None:
    """Warn once per distinct message (Python's default filter keeps one per message)."""
    import warnings

    warnings.warn(message, ClipAdaptWarning, stacklevel=2)
