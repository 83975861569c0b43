"""The training loop's parts on their own, in process: the schedule worked by hand, one step on a toy model,
the loss meter's window and non-finite stop, and the weight-0 rule for unreadable micro-batches."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from simmim.batches import TrainBatches
from simmim.checkpoints import CheckpointManager
from simmim.config import DataConfig, OptimConfig, TrainConfig
from simmim.engine import TrainState, train_step
from simmim.errors import NonFiniteLossError
from simmim.meter import LossMeter
from simmim.optim import Schedule, param_groups


def test_schedule_by_hand():
    # 1000 images over 2 processes at 16 per micro-batch: 1000 // 32 = 31 micro-batches per process and
    # epoch; 3 of them per optimizer step -> 10 steps an epoch (the last micro-batch unused).
    s = Schedule.build(
        1000,
        DataConfig(batch_size=16),
        OptimConfig(base_lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, grad_accum_steps=3),
        TrainConfig(epochs=5, max_steps=30),
        world_size=2,
    )
    assert (s.micro_batches_per_epoch, s.steps_per_epoch) == (31, 10)
    assert (s.schedule_steps, s.total_steps, s.warmup_steps) == (50, 30, 5)
    assert s.global_batch == 96  # 16 x 2 processes x 3 micro-batches
    assert s.peak_lr == pytest.approx(1e-3 * 96 / 512) and s.min_lr == pytest.approx(1e-5 * 96 / 512)
    # Warmup peak * (step + 1) / 5; then the cosine from step 5 to 50, whatever max_steps cuts off.
    assert s.lr(0) == pytest.approx(s.peak_lr / 5)
    assert s.lr(4) == pytest.approx(s.peak_lr)
    half = s.min_lr + (s.peak_lr - s.min_lr) / 2  # progress (27.5 - 5) / 45 = 1/2 has no integer step
    assert s.lr(27) > half > s.lr(28)
    assert s.lr(50) == s.lr(70) == pytest.approx(s.min_lr)


def test_schedule_refuses_a_split_smaller_than_a_step():
    with pytest.raises(ValueError, match="has 10 images, fewer than one optimizer step"):
        Schedule.build(10, DataConfig(batch_size=16), OptimConfig(), TrainConfig(), world_size=1)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)


def toy_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return ((model.linear(batch["pixel_values"]).squeeze(-1) - batch["labels"]) ** 2).mean()


def toy_batches(n: int, unreadable: set[int] = frozenset()):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
        if i in unreadable:
            x, y = x[:0], y[:0]  # every image of this micro-batch failed to decode
        yield {"pixel_values": x, "labels": y, "index": torch.arange(len(y)), "num_skipped": 8 - len(y)}


def toy_state(
    tmp_path, accum: int, lr: float = 0.1, data=None
) -> tuple[TrainState, TrainBatches, Accelerator]:
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    optim = OptimConfig(base_lr=lr * 512 / 8, weight_decay=0.0, warmup_epochs=0, grad_accum_steps=accum)
    schedule = Schedule.build(64, DataConfig(batch_size=8), optim, TrainConfig(epochs=1), world_size=1)
    model = Toy()
    opt = torch.optim.AdamW(param_groups(model, 0.0, 1.0), lr=schedule.peak_lr)
    model, opt = acc.prepare(model, opt)
    state = TrainState(schedule, model, opt, None, CheckpointManager(tmp_path, acc))
    batches = TrainBatches(iter(data or ()), acc.device, fallback=lambda: pytest.fail("no fallback needed"))
    return state, batches, acc


def test_train_step_equals_a_hand_written_adamw_step(tmp_path):
    micro = list(toy_batches(2))
    state, batches, acc = toy_state(tmp_path, accum=2, data=micro)
    ref = Toy()
    ref.load_state_dict(acc.unwrap_model(state.model).state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=state.schedule.lr(0), weight_decay=0.0)
    # Two micro-batches of equal size, each weighted 1/2: the gradient of the mean of their losses.
    losses = [toy_loss(ref, m) for m in micro]
    (0.5 * losses[0] + 0.5 * losses[1]).backward()
    ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    ref_opt.step()

    meter = LossMeter(acc.device)
    optim = OptimConfig(grad_accum_steps=2, clip_grad=None)
    grad_norm = train_step(state, batches, toy_loss, meter, acc, optim)
    assert float(grad_norm) == pytest.approx(float(ref_norm), rel=1e-6)
    for p, q in zip(acc.unwrap_model(state.model).parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    images, skipped, mean_loss, _, _ = meter.close_window(acc)
    assert (images, skipped) == (16, 0)
    assert mean_loss == pytest.approx((losses[0].item() + losses[1].item()) / 2)


def test_an_unreadable_micro_batch_repeats_the_last_one_with_weight_zero(tmp_path):
    micro = list(toy_batches(2, unreadable={1}))
    state, batches, acc = toy_state(tmp_path, accum=2, data=micro)
    ref = Toy()
    ref.load_state_dict(acc.unwrap_model(state.model).state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=state.schedule.lr(0), weight_decay=0.0)
    (0.5 * toy_loss(ref, micro[0])).backward()  # the second forward counts 0
    ref_opt.step()

    meter = LossMeter(acc.device)
    train_step(state, batches, toy_loss, meter, acc, OptimConfig(grad_accum_steps=2, clip_grad=None))
    for p, q in zip(acc.unwrap_model(state.model).parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    assert (meter.micro_batches, meter.images, meter.skipped) == (1, 8, 8)


def test_the_loader_wait_is_measured_per_window(tmp_path):
    """The time train_step spends waiting for its micro-batches is the window's data_wait: a loader that
    takes 50 ms a batch makes most of a toy step's time waiting, and closing the window resets it."""
    import time

    def slow(batches):
        for batch in batches:
            time.sleep(0.05)
            yield batch

    state, _, acc = toy_state(tmp_path, accum=2)
    batches = TrainBatches(slow(toy_batches(4)), acc.device, fallback=lambda: None)
    meter = LossMeter(acc.device)
    for _ in range(2):
        train_step(state, batches, toy_loss, meter, acc, OptimConfig(grad_accum_steps=2, clip_grad=None))
    assert meter.data_wait >= 4 * 0.05
    images, _, _, seconds, wait = meter.close_window(acc)
    assert images == 32 and 0.2 <= wait <= seconds and wait / seconds > 0.5
    assert meter.data_wait == 0.0


def test_loss_meter_window_and_non_finite_stop(tmp_path):
    acc = Accelerator(cpu=True)
    meter = LossMeter(acc.device)
    meter.add(torch.tensor(1.0), 4, step=0)
    meter.add(torch.tensor(3.0), 4, step=1)
    meter.skipped += 2
    images, skipped, mean_loss, seconds, wait = meter.close_window(acc)
    assert (images, skipped, mean_loss) == (8, 2, 2.0) and seconds >= 0 and wait == 0.0
    assert (meter.micro_batches, meter.images, float(meter.loss_sum)) == (0, 0, 0.0)  # a new window
    checkpoints = CheckpointManager(tmp_path, acc)
    meter.check_finite(acc, checkpoints)  # nothing bad yet
    meter.add(torch.tensor(float("nan")), 4, step=7)
    meter.add(torch.tensor(float("inf")), 4, step=9)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 7; no checkpoint had been saved yet"):
        meter.check_finite(acc, checkpoints)
    checkpoints.save(5, {"counters": {}})
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint \(.*step_0+5\) is intact"):
        meter.check_finite(acc, checkpoints)


def test_train_state_saves_and_resumes(tmp_path):
    state, _, acc = toy_state(tmp_path, accum=1)
    state.step = 3
    state.counters.images_seen = 24
    state.counters.best = {"top1": 50.0, "step": 3, "ema": False}
    state.save()
    saved = {k: v.clone() for k, v in acc.unwrap_model(state.model).state_dict().items()}
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)

    cfg = type("Cfg", (), {})()
    cfg.output_dir, cfg.data, cfg.seed = tmp_path, DataConfig(batch_size=8), 0
    cfg.optim, cfg.train = OptimConfig(warmup_epochs=0), TrainConfig(epochs=1, ema=None)
    resumed = TrainState.start(cfg, Toy(), Accelerator(cpu=True), 64)
    assert resumed.step == 3 and resumed.counters.images_seen == 24 and resumed.counters.best["top1"] == 50.0
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert resumed.compiled[0] is False  # train.compile=auto in fp32 on a CPU, and the first start ran eager


def test_a_resume_keeps_the_compile_choice_of_the_first_start(tmp_path, monkeypatch):
    """train.compile=auto's rule can change (a new threshold) or give another answer on another CPU; a resume
    keeps what the run's first start chose, since compiled and eager steps differ in the last bits."""
    import simmim
    from simmim.compilation import CACHE_ENV

    monkeypatch.setattr(simmim, "INDUCTOR_CACHE_CHOSEN", None)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "inductor"))  # the compile cache is set for the run
    state, _, _ = toy_state(tmp_path, accum=1)
    state.compiled = (True, "its first start: bf16 on a CPU, a long run")
    state.step = 2
    state.save()
    cfg = type("Cfg", (), {})()
    cfg.output_dir, cfg.data, cfg.seed = tmp_path, DataConfig(batch_size=8), 0
    cfg.optim, cfg.train = OptimConfig(warmup_epochs=0), TrainConfig(epochs=1, ema=None)
    assert cfg.train.compile == "auto"  # which alone would not compile 8 fp32 steps on a CPU
    resumed = TrainState.start(cfg, Toy(), Accelerator(cpu=True), 64)
    assert resumed.compiled[0] is True and "as the run's first start chose" in resumed.compiled[1]
    cfg.train = TrainConfig(epochs=1, ema=None, compile=False)  # an explicit setting still wins
    assert TrainState.start(cfg, Toy(), Accelerator(cpu=True), 64).compiled == (False, "train.compile=false")


def test_too_many_unreadable_images_name_the_intact_checkpoint(tmp_path):
    from simmim.data import BadImageError

    state, _, _ = toy_state(tmp_path, accum=1)
    state.count(1000, 5, max_bad_fraction=0.01)  # 0.5%: tolerated
    with pytest.raises(BadImageError, match=r"could not be decoded .*; no checkpoint had been saved yet"):
        state.count(0, 20, max_bad_fraction=0.01)


def test_a_value_error_inside_the_loop_keeps_its_traceback(capsys):
    """simmim.cli reports ValueError and OSError in one line, as a user's mistake; raised inside the loop
    they are bugs or machine failures, and the command line must show their traceback."""
    from types import SimpleNamespace

    from simmim.cli import run_main
    from simmim.engine import bugs_keep_their_traceback

    def main():
        with bugs_keep_their_traceback(SimpleNamespace(step=3)):
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match="training stopped at step 3 by ValueError: boom") as info:
        run_main(main)
    assert isinstance(info.value.__cause__, ValueError)
    # ... while the same error outside the loop is a user's mistake: one line, exit code 2.
    assert run_main(lambda: (_ for _ in ()).throw(ValueError("data.path='x': no such dataset"))) == 2
    assert capsys.readouterr().err == "error: data.path='x': no such dataset\n"


@pytest.mark.parametrize(
    "setting, precision, device, steps, expected, reason",
    [
        (True, "no", "cpu", 10, True, "train.compile=true"),
        (False, "bf16", "cpu", 10_000, False, "train.compile=false"),
        ("auto", "no", "cpu", 10_000, False, "fp32 on a CPU"),  # measured 0.97-1.00x on AVX2
        ("auto", "bf16", "cpu", 2999, False, "fewer than the 3000"),  # too short to repay the compile
        ("auto", "bf16", "cpu", 3000, True, "measured 1.01-1.20x"),
        ("auto", "bf16", "cuda", 10_000, False, "not yet measured on cuda"),
        ("auto", "bf16-emulated", "cpu", 10_000, False, "bf16 emulated on this CPU"),
    ],
)
def test_compile_auto_rule(setting, precision, device, steps, expected, reason, monkeypatch):
    import simmim.compilation
    from simmim.compilation import choose_compile

    native = precision != "bf16-emulated"  # the CPU's flags, as simmim.precision reads them
    monkeypatch.setattr(simmim.compilation, "bf16_hardware", lambda: (native, "test"))
    compiled, why = choose_compile(setting, precision.removesuffix("-emulated"), device, steps)
    assert compiled is expected and reason in why


def test_compile_keeps_inductor_cache_with_the_run(tmp_path, monkeypatch):
    import simmim
    from simmim.compilation import CACHE_ENV, keep_cache_with_run

    monkeypatch.setattr(simmim, "INDUCTOR_CACHE_CHOSEN", None)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert keep_cache_with_run(tmp_path) == tmp_path.resolve() / "compile_cache"
    # Importing torchvision sets inductor's /tmp default, and a run sets its own folder: neither is the
    # user's choice, so the next run's folder replaces them.
    monkeypatch.setenv(CACHE_ENV, "/tmp/torchinductor_someone")
    assert keep_cache_with_run(tmp_path / "b") == (tmp_path / "b").resolve() / "compile_cache"
    assert keep_cache_with_run(tmp_path / "c") == (tmp_path / "c").resolve() / "compile_cache"
    monkeypatch.setattr(simmim, "INDUCTOR_CACHE_CHOSEN", "/elsewhere")  # the user's own choice wins
    monkeypatch.setenv(CACHE_ENV, "/elsewhere")
    assert str(keep_cache_with_run(tmp_path)) == "/elsewhere"


def test_loader_workers_default_from_the_machine(monkeypatch):
    import os

    from simmim.config import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 2 and DataConfig().num_workers == 2  # a 2-core machine: 2, not 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_num_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on 16 CPUs: 2 each
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_num_workers() == 2
    assert DataConfig(num_workers=0).num_workers == 0


class ToyTask:
    """A fake task for `engine.train`, in process: a linear classifier on 8 px synthetic images."""

    select_metric = "top1"
    eval_each_epoch = True
    has_probe = False

    def __init__(self, accelerator):
        from simmim.data import LabeledImageDataset, collate_classification, eval_transform, open_source

        self.accelerator = accelerator
        source = open_source("synthetic", "train", synthetic_size=64, synthetic_image_size=8)
        self.train_set = LabeledImageDataset(source, eval_transform(8, mean=(0.5,) * 3, std=(0.5,) * 3))
        self.collate_fn = collate_classification
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        self.evaluated, self.exported = [], []

    poison: tuple[int, str] | None = None  # (an image index, "nan" or "spike"): a bad sample, for rollbacks

    def loss(self, model, batch):
        loss = nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        if self.poison is not None and self.poison[0] in batch["index"].tolist():
            return loss * float("nan") if self.poison[1] == "nan" else loss * 100
        return loss

    def evaluate(self, model, step, log):
        self.evaluated.append(step)
        return {"top1": float(step % 3)}  # best at step 8 (2.0), which the export must hold

    def export(self, model, directory):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "w.safetensors")
        )
        self.exported.append(directory)

    def probe(self, model):
        return {}


def test_the_loop_runs_a_fake_task_in_process(tmp_path):
    """train(task, cfg) with a task made here: it evaluates every epoch (4 steps of 16 images), exports at
    each new best evaluation, checkpoints, and a second call on the same output_dir resumes at the end."""
    from simmim.config import FinetuneConfig
    from simmim.engine import train

    cfg = FinetuneConfig(
        output_dir=str(tmp_path), data=DataConfig(path="synthetic", batch_size=16, num_workers=0),
        optim=OptimConfig(base_lr=0.1, warmup_epochs=0), train=TrainConfig(epochs=3, save_every_steps=4, precision="fp32"),
    )  # fmt: skip
    task = ToyTask(Accelerator(cpu=True))
    summary = train(task, cfg)
    assert summary["step"] == 12 and task.evaluated == [4, 8, 12]
    assert summary["best"]["step"] == 8 and summary["best"]["top1"] == 2.0
    # At each new best (steps 4 and 8), not at the end: the export holds step 8's weights.
    assert [d.name for d in task.exported] == ["export", "export"]
    assert (tmp_path / "checkpoints" / "index.json").is_file() and (tmp_path / "log.jsonl").is_file()
    again = ToyTask(Accelerator(cpu=True))
    assert train(again, cfg)["step"] == 12 and again.evaluated == []  # resumed at its last step: nothing left


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(tmp_path, caplog):
    """A truncated safetensors file, an index naming a missing step, an unreadable index: resume from the
    newest intact checkpoint with a warning naming the bad one, and end with the same weights as the
    uninterrupted run; with no intact checkpoint, one line and no training from random weights."""
    import logging
    import shutil

    from safetensors.torch import load_file

    from simmim.config import FinetuneConfig
    from simmim.engine import train
    from simmim.rundir import DamagedCheckpointError, latest_checkpoint

    cfg = FinetuneConfig(
        output_dir=str(tmp_path), data=DataConfig(path="synthetic", batch_size=16, num_workers=0),
        optim=OptimConfig(base_lr=0.1, warmup_epochs=0),
        train=TrainConfig(epochs=3, save_every_steps=4, keep_last=3, precision="fp32"),
    )  # fmt: skip
    train(ToyTask(Accelerator(cpu=True)), cfg)
    checkpoints = tmp_path / "checkpoints"
    # Copied: load_file's tensors can share the file's memory map, which the truncation below would change.
    final = {
        k: v.clone() for k, v in load_file(str(checkpoints / "step_00000012" / "model.safetensors")).items()
    }
    weights = checkpoints / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated by a full disk or a killed copy
    with caplog.at_level(logging.WARNING, logger="simmim"):
        assert latest_checkpoint(tmp_path) == checkpoints / "step_00000008"
    assert "step_00000012: model.safetensors is damaged" in caplog.text
    assert train(ToyTask(Accelerator(cpu=True)), cfg)["step"] == 12  # steps 9-12 again, from step 8
    again = load_file(str(checkpoints / "step_00000012" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)

    shutil.rmtree(checkpoints / "step_00000012")  # the index still names it
    assert latest_checkpoint(tmp_path) == checkpoints / "step_00000008"
    (checkpoints / "index.json").write_text("{not json")
    assert latest_checkpoint(tmp_path) == checkpoints / "step_00000008"  # from the directories
    for step in ("00000004", "00000008"):
        (checkpoints / f"step_{step}" / "trainer_state.json").write_text("")
    with pytest.raises(DamagedCheckpointError, match=r"no intact checkpoint in .*checkpoints \(.*step_00000008: "
                       r"trainer_state.json is unreadable"):  # fmt: skip
        train(ToyTask(Accelerator(cpu=True)), cfg)


@pytest.mark.parametrize("stage", ["accelerate_state", "ema_tensors", "trainer_state", "rename", "index"])
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, stage):
    """A write that fails at any stage of a save (the disk full): a periodic save warns and training goes
    on with the previous checkpoint and index intact; a failed last save stops the run with one line naming
    the intact checkpoint."""
    import errno
    import json
    import os

    import simmim.checkpoints as checkpoints_module
    from simmim.config import FinetuneConfig
    from simmim.engine import train
    from simmim.errors import CheckpointWriteError
    from simmim.rundir import checkpoint_problem, latest_checkpoint

    failing = {"step": None}  # the step whose save fails
    full = OSError(errno.ENOSPC, "No space left on device", "checkpoints")

    def check(path) -> None:  # fails the write of the failing step's checkpoint (its path names the step)
        if failing["step"] is not None and f"step_{failing['step']:08d}" in str(path):
            raise full

    if stage == "accelerate_state":
        original = Accelerator.save_state
        monkeypatch.setattr(
            Accelerator, "save_state", lambda self, d, **k: (check(d), original(self, d, **k))[1]
        )
    elif stage == "ema_tensors":
        original_save_file = checkpoints_module.save_file
        monkeypatch.setattr(
            checkpoints_module, "save_file", lambda t, f, **k: (check(f), original_save_file(t, f, **k))[1]
        )
    elif stage in ("trainer_state", "index"):
        original_json = checkpoints_module._write_json_atomic
        name = "trainer_state.json" if stage == "trainer_state" else "index.json"

        def write_json(path, obj):
            if path.name == name:  # the index names the step it is about to make the latest
                check(path if stage == "trainer_state" else obj["latest"])
            return original_json(path, obj)

        monkeypatch.setattr(checkpoints_module, "_write_json_atomic", write_json)
    else:  # the rename of .tmp-step_N to step_N
        original_replace = os.replace

        def replace(src, dst):
            if ".tmp-step_" in str(src):
                check(dst)
            return original_replace(src, dst)

        monkeypatch.setattr(checkpoints_module.os, "replace", replace)

    cfg = FinetuneConfig(
        output_dir=str(tmp_path), data=DataConfig(path="synthetic", batch_size=16, num_workers=0),
        optim=OptimConfig(base_lr=0.1, warmup_epochs=0),
        train=TrainConfig(epochs=3, save_every_steps=4, keep_last=3, precision="fp32", ema=0.9),
    )  # fmt: skip
    failing["step"] = 8  # a periodic save: warned, and training goes on
    assert train(ToyTask(Accelerator(cpu=True)), cfg)["step"] == 12
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "save_failed"] == [8]
    assert "step_00000004 is intact" in next(r["error"] for r in log if r["kind"] == "save_failed")
    assert checkpoint_problem(latest_checkpoint(tmp_path)) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

    failing["step"] = 16  # the last save of a longer run fails: one line, the run stops, step 12 intact
    longer = FinetuneConfig(**{**cfg.__dict__, "train": TrainConfig(epochs=4, save_every_steps=4, keep_last=3,
                                                                     precision="fp32", ema=0.9)})  # fmt: skip
    with pytest.raises(CheckpointWriteError, match=r"saving step 16 failed \(No space left on device: "
                       r"checkpoints\); .*step_00000012 is intact"):  # fmt: skip
        train(ToyTask(Accelerator(cpu=True)), longer)
    assert latest_checkpoint(tmp_path).name == "step_00000012"
    assert checkpoint_problem(latest_checkpoint(tmp_path)) is None


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_a_bad_batch_is_rolled_back_and_skipped_and_a_resume_ends_the_same(tmp_path, kind):
    """Image 5 makes the loss NaN (or 100x: a spike past train.spike_factor) each time it is read: every
    time, the run goes back to its last checkpoint, skips the batches that led there and goes on; each
    rollback is logged; a run stopped after a rollback and resumed ends with the uninterrupted run's weights."""
    import json

    from safetensors.torch import load_file

    from simmim.config import FinetuneConfig
    from simmim.engine import train

    def config(out, max_steps=None):
        train_cfg = TrainConfig(
            epochs=2, save_every_steps=2, log_every_steps=1, precision="fp32", max_steps=max_steps,
            on_nonfinite="rollback", rollback_skip_batches=1, max_rollbacks=10,
            spike_factor=5.0 if kind == "spike" else None,
        )  # fmt: skip
        return FinetuneConfig(
            output_dir=str(out), data=DataConfig(path="synthetic", batch_size=16, num_workers=0),
            optim=OptimConfig(base_lr=0.1, warmup_epochs=0), train=train_cfg,
        )  # fmt: skip

    def task():
        t = ToyTask(Accelerator(cpu=True))
        t.poison = (5, kind)
        return t

    summary = train(task(), config(tmp_path / "a"))
    assert summary["step"] == 8 and len(summary["rollbacks"]) >= 2  # image 5 is read once an epoch
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r["kind"] == "rollback"]
    assert len(rollbacks) == len(summary["rollbacks"])
    assert all(r["skipped_steps"] >= 1 and r["restored_step"] <= r["at_step"] for r in rollbacks)
    assert ("non-finite" if kind == "nan" else "spike") in rollbacks[0]["seen"]
    final = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())

    train(task(), config(tmp_path / "b", max_steps=5))  # stopped after the first rollback
    assert train(task(), config(tmp_path / "b"))["step"] == 8
    resumed = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_without_rollback_a_non_finite_loss_stops_the_run(tmp_path):
    from simmim.config import FinetuneConfig
    from simmim.engine import train
    from simmim.errors import NonFiniteLossError

    cfg = FinetuneConfig(
        output_dir=str(tmp_path), data=DataConfig(path="synthetic", batch_size=16, num_workers=0),
        optim=OptimConfig(base_lr=0.1, warmup_epochs=0),
        train=TrainConfig(epochs=2, save_every_steps=2, log_every_steps=1, precision="fp32"),  # auto: 8 steps
    )  # fmt: skip
    t = ToyTask(Accelerator(cpu=True))
    t.poison = (5, "nan")
    with pytest.raises(NonFiniteLossError, match="the loss became non-finite at step"):
        train(t, cfg)


def test_compiled_kernels_land_in_the_run_folder(tmp_path, monkeypatch):
    """What compiles after keep_cache_with_run, with torch and torchvision imported (inductor's /tmp default
    set), is written under the run's folder: a resume on another machine, or after /tmp was cleared, finds
    it there."""
    import simmim
    from simmim.compilation import CACHE_ENV, keep_cache_with_run

    monkeypatch.setattr(simmim, "INDUCTOR_CACHE_CHOSEN", None)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "inductor_default"))  # as torchvision's import leaves it
    cache = keep_cache_with_run(tmp_path / "run")
    assert cache == (tmp_path / "run").resolve() / "compile_cache"
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 3.25).tanh() - x)
    x = torch.randn(16)
    assert torch.allclose(compiled(x), (x * 3.25).tanh() - x, atol=1e-6)
    assert any(path.is_file() for path in cache.rglob("*")), "inductor wrote nothing under the run's folder"
