"""Remote streams (`data.path` an http URL of a folder of shards): network errors (dropped connections, HTTP
500s) from a local server on loopback are retried, and the stream reads as without them; a server that
always fails stops the run with one line naming the shard and the last error; a damaged shard is still
skipped and counted."""

from __future__ import annotations

import http.server
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import TINY_MODEL, run_script
from test_streams import write_tar_shards

from simmim.data import open_source
from simmim.data.remote import RetryPolicy, is_network_error
from simmim.errors import RemoteReadError

FAST = RetryPolicy(retries=3, backoff_s=0.01)  # waits of 10, 20 and 40 ms: the tests' time is not in waits


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves `root` on 127.0.0.1 (port 0: any free one). Each request for a shard (.tar) takes the next of
    `faults`, then "ok" once they are used up: "500", or "drop" (the connection closed after half the
    body). Bodies are chunked, with no length, so the client streams them, as it does a large shard's."""

    daemon_threads = True

    def __init__(self, root: Path, faults: list[str] | None = None, always: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.faults, self.always, self.requests = root, list(faults or []), always, []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-body (fsspec reading only the headers for a size) is no error here

    def fault(self, path: str, head: bool) -> str:
        """What to do with this request; a HEAD request fails with `always` only, and uses no fault."""
        with self.lock:
            if not path.endswith(".tar"):
                return "ok"
            if head:
                return "500" if self.always == "500" else "ok"
            self.requests.append(path)
            return self.always or (self.faults.pop(0) if self.faults else "ok")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self.respond(body=False)

    def do_GET(self) -> None:
        self.respond(body=True)

    def respond(self, body: bool) -> None:
        file = self.server.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        fault = self.server.fault(self.path, head=not body)
        if fault == "500":
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not body:
            return
        data = file.read_bytes()
        cut = len(data) // 2 if fault == "drop" else len(data)
        for start in range(0, cut, 4096):
            chunk = data[start : min(start + 4096, cut)]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if fault == "drop":
            self.close_connection = True
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(b"0\r\n\r\n")


@contextmanager
def serving(root: Path, **faults) -> Iterator[ShardServer]:
    server = ShardServer(root, **faults)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# datasets reads a webdataset shard up to 1000 examples at a time (a batched cast of the image column):
# shards of 1200 break mid-way when a connection drops halfway. The images are never decoded here.
PER_SHARD = 1200
EXAMPLES = [(b"not decoded", i % 10) for i in range(3 * PER_SHARD)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 tar shards of 1200 examples, with index.json."""
    root = tmp_path_factory.mktemp("remote")
    write_tar_shards(root, EXAMPLES, PER_SHARD)
    return root


def read(server: ShardServer, faults: list[str] | None = None, always: str | None = None, retry=FAST):
    """The names of the examples of one shuffled pass over the server's shards (the source opened before
    the faults start), and the server's requests for shards while it was read."""
    source = open_source(server.url, "train", streaming=True, val_fraction=0.0, retry=retry)
    server.faults, server.always, server.requests = list(faults or []), always, []
    stream = source.stream(shuffle=True, seed=0, shuffle_buffer=8)
    names = [name.rsplit(":", 1)[-1] if payload is not None else name for payload, _, name in stream]
    return names, [r for r in server.requests if r.endswith(".tar")]


def test_network_errors_are_retried_and_the_stream_is_unchanged(shards, caplog):
    with serving(shards) as server:
        clean, _ = read(server)
        # (a shard is opened with a GET that reads only its headers, for its size: a drop there is harmless)
        faults = ["500", "ok", "drop", "ok", "ok", "500", "ok", "drop", "500"]
        with caplog.at_level(logging.WARNING, logger="simmim.data"):
            retried, requests = read(server, faults)
    assert sorted(clean) == [f"train{i:06d}" for i in range(len(EXAMPLES))]
    assert retried == clean  # the same examples in the same order: the same batches
    warnings = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(warnings) >= 3 and len(requests) > 2 * 3
    # a dropped connection broke a shard mid-way: it was opened again and read on past what was given
    assert any(re.search(r"\(after [1-9]\d* examples\).*Server Disconnected", w) for w in warnings), warnings
    assert any("500, message='Internal Server Error'" in w for w in warnings), warnings


def test_a_server_that_always_fails_stops_the_read_with_one_line(shards):
    with serving(shards) as server:
        start = time.monotonic()
        with pytest.raises(RemoteReadError) as raised:
            read(server, always="500")
        took = time.monotonic() - start
    message = str(raised.value)
    assert "\n" not in message and took < 20
    assert re.match(
        rf"{re.escape(server.url)}/train-0000\d\.tar \(after 0 examples\): the remote read failed 4 times in a "
        r"row \(data.remote_retries=3\); the last error: .*500",
        message,
    ), message


def test_a_damaged_shard_is_skipped_and_counted_not_retried(shards, tmp_path, caplog):
    root = tmp_path / "damaged"
    write_tar_shards(root, EXAMPLES, PER_SHARD)
    data = (root / "train-00002.tar").read_bytes()
    (root / "train-00002.tar").write_bytes(data[: len(data) // 2 + 100])  # a partial upload
    with serving(root) as server, caplog.at_level(logging.WARNING, logger="simmim.data"):
        names, _ = read(server)
    damaged = [n for n in names if "damaged" in n]
    assert len(damaged) == 1 and "train-00002.tar" in damaged[0]
    assert 2 * PER_SHARD < len(names) - 1 < len(EXAMPLES)  # what preceded the damage is read
    assert not any("trying again" in r.getMessage() for r in caplog.records)


def test_network_errors_are_told_apart_from_damage():
    import tarfile

    import aiohttp
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    def raised_from(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    busy = httpx.Response(429, request=httpx.Request("GET", "https://huggingface.co/x.parquet"))
    server = aiohttp.ClientResponseError(None, (), status=503)
    forbidden = aiohttp.ClientResponseError(None, (), status=403)
    for error in (ConnectionResetError(), TimeoutError(), aiohttp.ClientPayloadError("cut"), server,
                  raised_from(ConnectionError("Server Disconnected"), server),
                  HfHubHTTPError("busy", response=busy)):  # fmt: skip
        assert is_network_error(error), error
    for error in (tarfile.ReadError("unexpected end of data"), ValueError("bad parquet"), forbidden,
                  raised_from(ConnectionError("Server Disconnected"), forbidden), FileNotFoundError("x.tar")):  # fmt: skip
        assert not is_network_error(error), error


def test_a_pretraining_run_on_a_failing_server_stops_with_one_line(shards, tmp_path):
    args = [f"output_dir={tmp_path / 'run'}", *TINY_MODEL, "data.streaming=true", "data.num_workers=0",
            "data.batch_size=4", "train.max_steps=2", "optim.warmup_epochs=null", "optim.warmup_steps=1",
            "data.remote_retries=2", "data.remote_backoff_s=0.05", "train.report_to=none"]  # fmt: skip
    with serving(shards, always="500") as server:
        start = time.monotonic()
        result = run_script("pretrain.py", [f"data.path={server.url}/", *args], timeout=120)
        took = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: {re.escape(server.url)}/train-00000.tar: the remote read failed 3 times in a row "
        r"\(data.remote_retries=2\); the last error: HTTPError: HTTP Error 500: Internal Server Error",
        line,
    ), line
    assert took < 60
