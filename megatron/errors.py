"""User-facing errors.

A ``UserError`` is a mistake in what the user gave us (a flag, a file, a record, a checkpoint):
entry points print it as one line and exit non-zero, without a traceback. Internal bugs raise
ordinary exceptions and keep their traceback.
"""

import errno
import sys

# Failures of the machine rather than of the program: a full disk or quota, a read-only file
# system, a permission refused. One line names the file; a traceback would not help.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """Bad user input. The message must name the flag, file or line and say what was expected."""


class NotImplementedYet(UserError, NotImplementedError):
    """A feature that is visibly not built yet: reported as one line (a UserError) and still a
    NotImplementedError for code that catches those."""


#: The exit status of a run ended by a user error (or a failure of the machine or a peer).
USER_ERROR_STATUS = 2


def print_error(message) -> None:
    """The one line a user error ends with: ``error: <message>`` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_main(main, *args, **kwargs):
    """Call ``main`` and turn a ``UserError`` -- or an OSError of the environment (disk full,
    read-only, permission) -- into one line on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print_error(err)
        sys.exit(USER_ERROR_STATUS)
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print_error(f"{where}{err.strerror}")
        sys.exit(USER_ERROR_STATUS)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
