"""Reading tokenizer files with errors that name the flag and the path."""

import os

from megatron.errors import UserError


def require_file(path, flag):
    """Return ``path`` as a string if it names a readable file, else a UserError naming ``flag``."""
    if path is None:
        raise UserError(f"{flag} is required for this --tokenizer-type")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{flag}: file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{flag}: not a file: {path}")
    return path


def read_text(path, flag):
    """The whole file as UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})") \
            from None
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot read: {err.strerror}") from None
