"""Errors the core reports as such (not as crashes): every one names what is wrong and where.

The command line prints any :class:`FsclError` as ``fscl: error: <message>`` (exit status 2)
instead of a traceback.
"""
from __future__ import annotations


class FsclError(Exception):
    """Base of the errors a user can act on; the message says what to change."""


class DataError(FsclError, RuntimeError):
    """A dataset root, file or image is missing or unreadable; the message names the path.

    Streams raise it (or a subclass); the runner checks every stream of a grid before any model is
    built, and records a run that meets one mid-run as failed, with the message as its reason.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the grid; the message says what was cut short and how it was recorded.

    A ``KeyboardInterrupt`` still (so nothing that catches ``Exception`` swallows it); the command line prints
    it as one line saying how to resume (exit status 130).
    """
