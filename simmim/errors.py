"""Errors that stop a run on purpose, each with a message that says what happened and what is intact; the
command line (`simmim.cli`) prints them as one line and exits with code 1. They live here, below the engine,
so that every script can catch them without importing the training stack."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last intact checkpoint."""


class StageFailed(RuntimeError):
    """A study's stage (one of the scripts) exited with an error; the message names it and its log."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a permission); the message names the intact one."""
