"""scripts/carry_study.py on a study folder laid out by hand: what is carried, and where it may be restored."""

import json

from helpers import run_script


def _stage(study, name, *, done, training=True, steps=(100, 200)):
    stage = study / name
    (stage / "compile_cache").mkdir(parents=True)
    (stage / "compile_cache" / "kernel.so").write_bytes(b"0")
    if training:
        (stage / "config.yaml").write_text(f"output_dir: {stage}\n")
        (stage / "export").mkdir()
        (stage / "export" / "model.safetensors").write_bytes(b"weights")
        names = [f"step_{s:08d}" for s in steps]
        for n in names:
            (stage / "checkpoints" / n).mkdir(parents=True)
            (stage / "checkpoints" / n / "model.safetensors").write_bytes(b"state")
        index = {"latest": names[-1], "checkpoints": names}
        (stage / "checkpoints" / "index.json").write_text(json.dumps(index))
    (stage / "metrics.json").write_text("{}")
    (stage / "study_stage.json").write_text(json.dumps({"done": done, "seconds": 1.0}))
    return stage


def test_save_keeps_what_the_study_needs_and_restore_only_where_it_was(tmp_path):
    study = tmp_path / "study"
    _stage(study, "pretrain", done=False)
    _stage(study, "scratch_cls_p10_s0", done=True)
    _stage(study, "simmim_cls_p10_s0", done=False)
    _stage(study, "probe", done=True, training=False)
    carried = tmp_path / "repo" / "study"
    result = run_script("carry_study.py", ["save", str(study), str(carried)])
    assert result.returncode == 0, result.stderr[-2000:]
    files = {str(p.relative_to(carried)) for p in carried.rglob("*") if p.is_file()}
    assert not any("compile_cache" in f for f in files)
    # Unfinished runs: the newest checkpoint alone, and an index naming only it.
    for name in ("pretrain", "simmim_cls_p10_s0"):
        assert f"{name}/checkpoints/step_00000200/model.safetensors" in files
        assert f"{name}/checkpoints/step_00000100/model.safetensors" not in files
        assert json.loads((carried / name / "checkpoints" / "index.json").read_text())["checkpoints"] == [
            "step_00000200"
        ]
    # A finished student: its records and metrics, not its weights.
    assert {f for f in files if f.startswith("scratch_cls_p10_s0/")} == {
        "scratch_cls_p10_s0/config.yaml", "scratch_cls_p10_s0/metrics.json", "scratch_cls_p10_s0/study_stage.json"
    }  # fmt: skip
    assert "probe/metrics.json" in files and "pretrain/export/model.safetensors" in files

    elsewhere = run_script("carry_study.py", ["restore", str(carried), str(tmp_path / "elsewhere")])
    assert elsewhere.returncode != 0 and "restore it there" in elsewhere.stderr
    taken = run_script("carry_study.py", ["restore", str(carried), str(study)])
    assert taken.returncode != 0 and "exists" in taken.stderr
    study.rename(tmp_path / "old")
    result = run_script("carry_study.py", ["restore", str(carried), str(study)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (study / "pretrain" / "checkpoints" / "step_00000200" / "model.safetensors").read_bytes() == b"state"
