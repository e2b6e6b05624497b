"""Two kinds of error: a user error names the bad value and the fix; anything else is a bug."""


class LlmtrtUserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it.

    The CLI prints it on one line and exits with code 2. Any other exception is an internal
    error and keeps its traceback.
    """
