"""fedseg's exception tree.

    FedsegError            any failure whose message is meant for the user
    └── DataError          a file, folder or field of a site's data is unusable

The CLI prints ``str(error)`` on one line and exits non-zero; everything else
is a bug and keeps its traceback.
"""


class FedsegError(Exception):
    """A failure the user can act on; the message names what and where."""


class DataError(FedsegError):
    """Input data is missing, unreadable or inconsistent."""
