"""How the scripts end when something goes wrong: one line on stderr, no traceback.

- A mistake in what was asked (a bad config value, a missing path, an unreadable recipe or checkpoint)
  prints `error: <message>` and exits with code 2, before any work.
- A run that stops itself (a non-finite loss, too many unreadable images) prints `error: <message>`, which
  says what happened and which checkpoint is intact, and exits with code 1.

With SIMMIM_DEBUG=1 the exception propagates with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import yaml

from simmim.data.decoding import BadImageError
from simmim.engine import NonFiniteLossError

USAGE_ERRORS = (ValueError, OSError, yaml.YAMLError)  # OSError: missing, unreadable or misplaced files
RUN_ERRORS = (NonFiniteLossError, BadImageError)


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
        return 1 if isinstance(e, RUN_ERRORS) else 2
    return 0 if code is None else int(code)
