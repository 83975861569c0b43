"""Errors that stop a run on purpose, each with a message that says what happened and what is intact; the
command line (`simmim.cli`) prints them as one line and exits with code 1. They live here, below the engine,
so that every script can catch them without importing the training stack."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (or spiked past train.spike_factor times its running mean); the
    message names the step and the last intact checkpoint. `step`: the 0-based step whose loss was bad;
    `seen`: what was seen, in words."""

    def __init__(self, message: str, step: int = -1, seen: str = "a non-finite loss") -> None:
        super().__init__(message)
        self.step, self.seen = step, seen


class StageFailed(RuntimeError):
    """A study's stage (one of the scripts) exited with an error; the message names it and its log."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a permission); the message names the intact one."""


class PeerLostError(RuntimeError):
    """Another process of a DDP or FSDP run stopped answering (train.collective_timeout_s passed) or closed
    its connection; the message says which, at what step, and names the intact checkpoint."""


class RemoteReadError(RuntimeError):
    """A remote stream's reads still failed after data.remote_retries tries; the message names the shard and
    the last error. torch's DataLoader re-raises a worker's error as its type with the worker's traceback
    as the message: the error's own line, the traceback's last, is kept."""

    def __init__(self, message: str) -> None:
        own = message.rstrip().splitlines()[-1].partition(f"{type(self).__name__}: ")[2] if message else ""
        super().__init__(own or message)
