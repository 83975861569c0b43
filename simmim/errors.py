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


class WorkerError(RuntimeError):
    """An error that may be raised inside a DataLoader worker: torch raises it again in the main process as
    its type, with the worker's traceback as the message ("Caught X in DataLoader worker ... Traceback ...:
    X: <message>"); the error's own line, the traceback's last, is taken back, so that the command line
    still prints one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class PeerLostError(RuntimeError):
    """Another process of a DDP or FSDP run stopped answering (train.collective_timeout_s passed) or closed
    its connection; the message says which, at what step, and names the intact checkpoint."""


class RemoteReadError(WorkerError):
    """A remote stream's reads still failed after data.remote_retries tries; the message names the shard and
    the last error."""


class LabelError(WorkerError):
    """An example's label is outside the run's classes; the message names the example (its shard or dataset,
    and its key). Raised where the example is read, which may be a loader worker."""
