"""Remote streams: a shard read over the network (HTTP(S) shards, a Hub dataset) that fails with a network
error (a reset or dropped connection, a timeout, an HTTP 5xx or 429) is opened again after a wait that
doubles each time, and read past the examples already given, so the stream goes on exactly where it was.
A damaged shard (a decode error, a truncated archive) is not a network error: `simmim.data.streams` skips
it and counts it. After `retries` failed tries in a row the run stops with `RemoteReadError`, naming the
shard and the last error.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from simmim.errors import RemoteReadError

logger = logging.getLogger("simmim.data")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` tries again after a network error (data.remote_retries), the first after `backoff_s`
    seconds (data.remote_backoff_s), each next one after twice the last wait. The defaults, 5 tries after
    1, 2, 4, 8 and 16 s, outlast half a minute of a server's or a proxy's failure (a restart, a burst of
    503s), and a server that is gone stops the run within that half minute plus the tries' own time."""

    retries: int = 5
    backoff_s: float = 1.0

    def wait(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1-based)."""
        return self.backoff_s * 2 ** (failures - 1)


def _status(error: BaseException) -> int | None:
    """The HTTP status a server answered with, as an error carries it: aiohttp's `status`, urllib's `code`,
    or its response's (httpx, requests and huggingface_hub errors). (aiohttp's protocol errors carry a
    `code` of their own, 400, for a body cut short: not the server's answer.)"""
    if isinstance(error, urllib.error.HTTPError):
        return error.code
    for value in (
        getattr(error, "status", None),
        getattr(getattr(error, "response", None), "status_code", None),
    ):
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# aiohttp (fsspec's HTTP) and httpx (huggingface_hub's) raise errors of their own, not OSErrors, for a dropped
# connection or an incomplete body: by module, so that neither needs to be imported here.
_NETWORK_MODULES = ("aiohttp", "httpx", "httpcore", "requests", "urllib3")


def is_network_error(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) is a network failure that a new try may not meet: a
    connection reset, refused or dropped, a timeout, an incomplete body, an HTTP 5xx or 429. Any other
    HTTP status (403, 404) is not: trying again gets the same answer."""
    chain = list(_chain(error))
    statuses = [s for s in map(_status, chain) if s is not None]
    if statuses:
        return statuses[-1] >= 500 or statuses[-1] == 429  # the innermost: what the server said
    for e in chain:
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if type(e).__module__.split(".")[0] in _NETWORK_MODULES and not isinstance(e, ValueError):
            return True
    return False


def describe(error: BaseException) -> str:
    """The error and, when it was raised from another (datasets' "Server Disconnected"), the innermost."""
    inner = list(_chain(error))[-1]
    words = f"{type(error).__name__}: {error}"
    return words if inner is error else f"{words} ({type(inner).__name__}: {inner})"


def retrying(call: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """`call()`, tried again after a network error as `policy` says; `what` names it in the messages."""
    for failures in itertools.count(1):
        try:
            return call()
        except Exception as e:
            _after_failure(e, what, failures, policy)
    raise AssertionError("unreachable")


def read_resuming(open_items: Callable[[], Iterator[T]], what: str, policy: RetryPolicy) -> Iterator[T]:
    """`open_items()`'s items; after a network error, opened again as `policy` says and read past the
    items already given, so the items are those of a read without errors. A try that gives new items
    starts the count of failures again."""
    given, failures = 0, 0
    while True:
        before = given
        try:
            for item in itertools.islice(open_items(), given, None):
                yield item
                given += 1
            return
        except Exception as e:
            failures = 1 if given > before else failures + 1
            _after_failure(e, f"{what} (after {given} examples)", failures, policy)


def _after_failure(error: Exception, what: str, failures: int, policy: RetryPolicy) -> None:
    """Wait before the next try, or raise: `error` itself when it is no network error, RemoteReadError when
    the tries are spent."""
    if not is_network_error(error):
        raise error
    if failures > policy.retries:
        raise RemoteReadError(
            f"{what}: the remote read failed {failures} times in a row (data.remote_retries={policy.retries}); "
            f"the last error: {' '.join(describe(error).split())}"
        ) from error
    wait = policy.wait(failures)
    logger.warning(
        "%s: %s; trying again in %g s (%d of %d)", what, describe(error), wait, failures, policy.retries
    )
    time.sleep(wait)


def read_json(url: str, timeout_s: float = 60) -> Any:
    """A JSON document over HTTP(S) (a shard folder's index.json)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def check_answers(url: str, timeout_s: float = 60) -> None:
    """A HEAD request for `url` that must succeed: datasets takes a shard whose server fails (5xx) for a
    missing one, and says only "Unable to find" it, which would not be retried."""
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()


def own_the_retries() -> None:
    """datasets retries a failed remote open or read itself, up to 20 times 5 s apart, then raises
    ConnectionError; under ours, its waits would stretch a dead server's stop to many minutes and hide
    the count: one try each, no wait. (Its module-level settings, so set in every loader worker too.)"""
    import datasets

    for name in ("STREAMING_READ_MAX_RETRIES", "STREAMING_OPEN_MAX_RETRIES"):
        setattr(datasets.config, name, 1)
    for name in ("STREAMING_READ_RETRY_INTERVAL", "STREAMING_OPEN_RETRY_INTERVAL"):
        setattr(datasets.config, name, 0)
    datasets.config.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = 0
    datasets.config.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = 0
