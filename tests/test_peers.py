"""A process lost under DDP (two CPU processes over gloo, started by accelerate launch) stops the others within
a bound, each with one line naming what happened and the checkpoint to resume from: one SIGKILLed (its
connection closes), then one SIGSTOPped (a hung peer: only train.collective_timeout_s ends the wait); the
same command then resumes, and ends with an uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import ROOT, TINY_MODEL, script_env, tiny_data
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo, to run two processes on the CPU",
)

TIMEOUT_S = 3  # train.collective_timeout_s of these runs
STEPS = 24
ARGS = [
    *tiny_data(synthetic_size=64, batch_size=4),
    *TINY_MODEL,
    "mask.patch_size=16",
    "train.precision=fp32",
    "train.report_to=none",
    f"train.max_steps={STEPS}",
    "train.save_every_steps=2",
    "train.log_every_steps=2",
    f"train.eval_every_steps={STEPS}",
    "train.eval_batches=1",
    "optim.warmup_epochs=null",
    "optim.warmup_steps=2",
    f"train.collective_timeout_s={TIMEOUT_S}",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, log: Path) -> subprocess.Popen:
    """accelerate launch of scripts/pretrain.py over 2 processes (gloo on the CPU), output to `log`."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(ROOT / "scripts" / "pretrain.py"), f"output_dir={out}", *ARGS,
    ]  # fmt: skip
    with open(log, "w") as sink:
        return subprocess.Popen(command, env=script_env(), stdout=sink, stderr=subprocess.STDOUT)


def latest_step(out: Path) -> int:
    try:
        return int(
            json.loads((out / "checkpoints" / "index.json").read_text())["latest"].removeprefix("step_")
        )
    except (FileNotFoundError, json.JSONDecodeError, KeyError, AttributeError):
        return -1


def worker(out: Path, rank: int) -> int:
    """The pid of the training process of `rank` of the run writing to `out` (torchrun sets RANK)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"output_dir={out}".encode() not in cmdline.read_bytes().split(b"\0"):
                continue
            environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
        except OSError:  # gone in between
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK" in b"".join(environ):
            return int(cmdline.parent.name)
    raise AssertionError(f"no rank-{rank} process writes to {out}")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
    except OSError:
        return False


def wait_for(condition, seconds: float) -> float:
    """Poll `condition` until it holds; returns the seconds it took (fails past `seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - start


def interrupt(out: Path, log: Path, sig: signal.Signals, after_step: int) -> tuple[float, str]:
    """Launch the run, send `sig` to rank 1 once a checkpoint past `after_step` is saved, and wait for
    rank 0 to exit; returns the seconds rank 0 took to exit and the launcher's output."""
    launcher = launch(out, log)
    try:
        wait_for(lambda: latest_step(out) > after_step or launcher.poll() is not None, 120)
        assert launcher.poll() is None, f"the run ended before {sig.name}:\n{log.read_text()[-3000:]}"
        survivor, peer = worker(out, 0), worker(out, 1)
        os.kill(peer, sig)
        took = wait_for(lambda: not running(survivor), 60)
        if sig == signal.SIGSTOP:  # the launcher sends it SIGTERM, which a stopped process holds
            os.kill(peer, signal.SIGKILL)
        assert launcher.wait(timeout=60) != 0
    finally:
        launcher.kill()
    return took, log.read_text()


def test_a_lost_peer_stops_the_run_with_one_line_and_the_same_command_resumes_exactly(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    launcher = launch(reference, tmp_path / "reference.log")
    assert launcher.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # SIGKILL: the survivor's next collective finds the connection closed at once.
    took, output = interrupt(out, tmp_path / "killed.log", signal.SIGKILL, after_step=2)
    lines = re.findall(r"^error: a peer process.*$", output, re.M)
    assert len(lines) == 1, output[-3000:]
    killed_at = latest_step(out)
    assert re.fullmatch(
        r"error: a peer process's connection closed \(it exited or was killed\) at step \d+; the last good "
        rf"checkpoint \({re.escape(str(out))}/checkpoints/step_0*{killed_at}\) is intact: run the same command "
        "again to resume from it",
        lines[0],
    ), lines[0]
    assert took < TIMEOUT_S + 10, f"the survivor took {took:.1f} s to exit after its peer was killed"

    # SIGSTOP: a hung peer; only the timeout ends the survivor's wait.
    took, output = interrupt(out, tmp_path / "stopped.log", signal.SIGSTOP, after_step=killed_at + 2)
    assert f"resuming from {out}/checkpoints/step_{killed_at:08d}" in output
    lines = re.findall(r"^error: a peer process.*$", output, re.M)
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith(
        f"error: a peer process did not answer within {TIMEOUT_S} s (train.collective_timeout_s) at step"
    ), lines[0]
    assert "is intact: run the same command again to resume from it" in lines[0]
    assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 10, f"the survivor took {took:.1f} s to exit"

    stopped_at = latest_step(out)
    assert killed_at < stopped_at < STEPS
    launcher = launch(out, tmp_path / "resumed.log")
    assert launcher.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert f"resuming from {out}/checkpoints/step_{stopped_at:08d}" in (tmp_path / "resumed.log").read_text()
    mine, theirs = (load_file(str(d / "export" / "model.safetensors")) for d in (out, reference))
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in theirs)


def test_a_collective_error_is_told_apart_from_other_errors():
    from simmim.launch import peer_failure

    # gloo's messages (torch 2.14) for a killed peer and for one that did not answer
    closed = RuntimeError(
        "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1459: Connection reset by peer."
    )
    timed_out = RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation"
    )
    assert peer_failure(closed) == "a peer process's connection closed (it exited or was killed)"
    assert peer_failure(timed_out) == "a peer process did not answer within 3 s (train.collective_timeout_s)"
    assert peer_failure(RuntimeError("CUDA out of memory")) is None
