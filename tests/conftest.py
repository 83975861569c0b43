"""Shared by every test file: under pytest-xdist (`-n 2`, the README's test command), each worker gets one
torch thread, so that two workers on a 2-core machine do not each start two threads and oversubscribe it."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
