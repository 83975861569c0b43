"""The command line: `[--recipe PATH] key.sub=value ...` into a validated config, `--help` listing every key,
and how the scripts end when something goes wrong: one line on stderr, no traceback.

- A mistake in what was asked (a bad config value, a missing path, an unreadable recipe or checkpoint)
  prints `error: <message>` and exits with code 2, before any work.
- A run that stops itself (a non-finite loss, too many unreadable images) prints `error: <message>`, which
  says what happened and which checkpoint is intact, and exits with code 1.

With SIMMIM_DEBUG=1 the exception propagates with its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from simmim.config import load_config
from simmim.config_fields import bounds, type_name
from simmim.data.decoding import BadImageError
from simmim.errors import (
    CheckpointWriteError,
    LabelError,
    NonFiniteLossError,
    PeerLostError,
    RemoteReadError,
    StageFailed,
)

T = TypeVar("T")
USAGE_ERRORS = (ValueError, OSError, yaml.YAMLError)  # OSError: missing, unreadable or misplaced files
# Runs that stop themselves: each message says what happened and which checkpoint is intact.
RUN_ERRORS = (
    NonFiniteLossError,
    BadImageError,
    StageFailed,
    CheckpointWriteError,
    PeerLostError,
    RemoteReadError,
    LabelError,
)


def error_line(e: BaseException) -> str:
    """`error: <message>` on one line."""
    if isinstance(e, OSError) and e.strerror and e.filename:  # raised by open() and friends: name the file
        message = f"{e.strerror}: {e.filename}"
    else:
        message = str(e) or type(e).__name__
    return "error: " + " ".join(message.split())


def run_main(main: Callable[[], Any]) -> int:
    """`main()`'s exit code (0 when it returns None); a known error becomes one line and code 1 or 2."""
    try:
        code = main()
    except BrokenPipeError:  # whoever read our output stopped (`--help | head`): exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (*RUN_ERRORS, *USAGE_ERRORS) as e:
        if os.environ.get("SIMMIM_DEBUG") == "1":
            raise
        print(error_line(e), file=sys.stderr)
        code = 1 if isinstance(e, RUN_ERRORS) else 2
    else:
        return 0 if code is None else int(code)
    _stop_loader_workers()
    return code


def _stop_loader_workers() -> None:
    """Kill the loader workers a failed run left running (torchdata's StatefulDataLoader leaves those that
    raised): they ignore SIGTERM (simmim.data.loader), which is how the exit stops daemonic children, and the
    process would wait for them forever. torch's SIGCHLD handler, which reports a killed worker as a
    failure, goes first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join()


def config_help(cls: type, prefix: str = "", base: Any = None) -> str:
    """Every key of ``cls`` with its type, default, help and range, sections headed by their docstring."""
    lines = []
    for name, info in cls.__pydantic_fields__.items():
        if dataclasses.is_dataclass(info.annotation):
            section = info.get_default(call_default_factory=True)
            lines += ["", f"{prefix}{name}: {(info.annotation.__doc__ or '').strip()}"]
            lines.append(config_help(info.annotation, f"{prefix}{name}.", section))
            continue
        value = getattr(base, name) if base is not None else info.default
        default = "(required)" if info.is_required() else f"= {json.dumps(value)}"
        notes = "; ".join(filter(None, [info.description, bounds(info)]))
        line = f"  {prefix}{name}: {type_name(info.annotation)} {default}"
        lines.append(f"{line}  # {notes}" if notes else line)
    return "\n".join(lines)


def parse_cli(cls: type[T], argv: list[str]) -> T:
    """``[--recipe PATH] key.sub=value ...`` -> validated config; ``--help`` prints every key and exits 0."""
    recipe, overrides = None, []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(f"usage: [--recipe PATH] key.sub=value ...\n\n{cls.__doc__.strip()}\n{config_help(cls)}")
            sys.exit(0)
        elif arg == "--recipe":
            recipe = next(args, None)
            if recipe is None:
                raise ValueError("--recipe: expected a path")
        elif arg.startswith("--recipe="):
            recipe = arg.partition("=")[2]
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}: usage is [--recipe PATH] key.sub=value ...")
        else:
            overrides.append(arg)
    return load_config(cls, recipe, overrides)
