"""User-facing errors. Library code raises SeaEdgeError (or a subclass) for anything a user can fix; the command
line prints its message as one line and exits non-zero, never a traceback."""

__all__ = ["SeaEdgeError"]


class SeaEdgeError(Exception):
    """A problem with the user's input (file, name, shape, option), described in one line."""
