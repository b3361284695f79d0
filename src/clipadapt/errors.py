"""The one exception type users see: one line naming the file or value and what was expected."""


class ClipAdaptError(Exception):
    """A user-facing error. The CLI prints ``clipadapt: error: <message>`` and exits 2."""
