"""The one exception type for bad user input.

Anything a user can get wrong (a path, a config field, a sampling value, an image) raises
`UserError` with one line that says what was wrong and what to do. The CLIs print that line and exit
non-zero instead of showing a traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message is one line, ready to print."""
