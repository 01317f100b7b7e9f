"""User-facing errors.

A ``UserError`` is a mistake in what the user gave us (a flag, a file, a record, a checkpoint):
entry points print it as one line and exit non-zero, without a traceback. Internal bugs raise
ordinary exceptions and keep their traceback.
"""

import sys


class UserError(Exception):
    """Bad user input. The message must name the flag, file or line and say what was expected."""


def run_main(main, *args, **kwargs):
    """Call ``main`` and turn a ``UserError`` into one line on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
