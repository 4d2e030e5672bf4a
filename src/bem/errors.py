"""Errors a user can act on. The `bem` command prints them as one line (plus a hint) and exits non-zero;
`bem --debug ...` shows the traceback. Anything else is a bug and is reported as one.

Each message names what is wrong where: the file (or folder, or database), the field, the value, and
what is allowed.
"""
from __future__ import annotations


class BEMError(Exception):
    """Base of every error that is the input's fault, not the program's."""

    hint: str = ""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        if hint:
            self.hint = hint


class CheckpointError(BEMError, ValueError):
    """A checkpoint or saved adapter is incomplete, damaged, or not the one asked for."""


class DatabaseError(BEMError):
    """A results database is missing, foreign, damaged or not writable."""


class DataError(BEMError, ValueError):
    """The prepared task data is missing, tampered with, or not the build a run folder was made with."""
