"""The one error type of data_prep: a problem the user can fix, told in one line.

Every message names what is wrong and the fix (a flag, a command, a path), so the CLI prints it
as is, without a traceback. Anything else that escapes is a bug in data_prep.
"""


class DataError(Exception):
    """Bad input or a dataset directory in the wrong state; the message says how to fix it."""


def first_line(e: BaseException) -> str:
    """The first line of a library's exception, to quote inside a one-line DataError."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
