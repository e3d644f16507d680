"""The one exception type for bad user input: the CLI prints its message on one line."""


class UserError(Exception):
    """Bad input (file, line, key, value) reported to the user without a traceback."""
