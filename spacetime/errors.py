"""One base class for errors a user can fix, and one way to turn any exception into a line of text.

`UserError` subclasses carry a message that names the input, what is wrong and what to do; the CLI
prints it as `spacetime: <message>` with exit status 2 instead of a traceback. Anything else is a bug
and keeps its traceback. `describe` is how a recorded error (a manifest row, a loader log line)
reads everywhere.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad input, config, output folder, missing model)."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder a command reads is not there: the message names it and what it should be (the
    output of which command). Still a FileNotFoundError for callers that handle absence."""


def describe(err: BaseException) -> str:
    """`TypeName: message` (just `TypeName` when the message is empty): one line for manifests and logs."""
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
