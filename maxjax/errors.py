"""The one exception type that means "the user gave us something we cannot use"."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a path, a file, a flag, a model we do not support.

    The message is one line that names the problem and the fix. The CLI prints it without a traceback and
    exits with status 2; the server turns it into a start-up failure with the same line.
    """
