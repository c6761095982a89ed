"""The one exception type for problems caused by the user's input.

Command-line entry points print a ``RaveError`` as a one-line message (no traceback) and exit with status 2;
everything else is a bug and keeps its traceback.
"""


class RaveError(Exception):
    """Bad input (a file, an option, a command-line value), with a message that says what to do."""
