"""Probes of a frozen encoder: kNN against a brute-force vote, the linear probe on hand-made features,
the class-balanced label subsets, pretraining's online probe and scripts/eval_probe.py end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import run_script as run
from helpers import tiny_config
from test_pretrain_e2e import TINY, final_weights

from simmim.data.sources import SubsetSource, balanced_subset, open_source
from simmim.evaluation.probe import (
    default_layers,
    extract_features,
    knn_classify,
    knn_probe,
    linear_probe,
    load_encoder,
    partial_finetune_probe,
)
from simmim.exports import config_from_timm
from simmim.models import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
    DeiTModel,
)
from simmim.models.checkpoint import to_timm_state_dict


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """DINO's weighted vote written out one query and one neighbour at a time."""
    votes = torch.zeros(len(queries), num_classes)
    for q in range(len(queries)):
        sims = []
        for i in range(len(bank)):
            a, b = queries[q], bank[i]
            sims.append((float(a @ b) / (a.norm().item() * b.norm().item()), i))
        for sim, i in sorted(sims, reverse=True)[:k]:
            votes[q, bank_labels[i]] += math.exp(sim / temperature)
    return votes


def test_knn_votes_match_a_brute_force_computation():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_classify(bank, labels, queries, num_classes=4, k=5, temperature=0.1, chunk=3)
    want = brute_force_knn(bank, labels, queries, 4, 5, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_knn_with_k_above_the_bank_size_uses_every_neighbour():
    bank = torch.eye(3)
    votes = knn_classify(bank, torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.1, 0.0]]), 3, k=20)
    assert votes.argmax().item() == 0 and (votes > 0).all()


def separable(n: int, seed: int):
    """One Gaussian blob per class in 16-d, far apart (fixed centres, noise drawn with `seed`)."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(100)) * 10
    labels = torch.arange(n) % 4
    return centres[labels] + torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)), labels


def test_linear_probe_separates_a_separable_set_and_is_at_chance_on_shuffled_labels():
    (tf, tl), (vf, vl) = separable(400, 0), separable(200, 1)
    assert linear_probe(tf, tl, vf, vl, 4, epochs=30)["top1"] >= 99.0
    assert knn_probe(tf, tl, vf, vl, 4)["top1"] >= 99.0
    # Shuffled labels carry nothing the features predict: held-out accuracy is chance (25% +- 1.4%).
    g = torch.Generator().manual_seed(2)
    features, queries = torch.randn(400, 16, generator=g), torch.randn(1000, 16, generator=g)
    shuffled = tl[torch.randperm(400, generator=g)]
    truth = torch.randint(0, 4, (1000,), generator=g)
    for result in (
        linear_probe(features, shuffled, queries, truth, 4, epochs=30),
        knn_probe(features, shuffled, queries, truth, 4),
    ):
        assert 19.0 <= result["top1"] <= 31.0


def test_linear_probe_is_deterministic():
    (tf, tl), (vf, vl) = separable(100, 3), separable(50, 4)
    assert linear_probe(tf, tl, vf, vl, 4, epochs=5) == linear_probe(tf, tl, vf, vl, 4, epochs=5)


def separable_tokens(n: int, seed: int, tokens: int = 17, width: int = 32, classes: int = 4):
    """(n, 1 + 16, 32) tokens whose patch tokens carry their class as a shift along one direction per class
    (weak per token, clear on average), and (n,) labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    directions = torch.randn(classes, width, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, tokens, width, generator=g)
    x[:, 1:] += 0.5 * directions[labels][:, None, :]
    return x, labels


def test_partial_finetune_probe_learns_from_hand_made_tokens_and_leaves_the_encoder_alone():
    """The last block, final LayerNorm and head train on the tokens entering the last block: near 100% on
    tokens that carry their class, chance on tokens that do not; the encoder's weights are not touched."""
    encoder = DeiTModel(tiny_config(hidden_size=32, num_attention_heads=4)).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    (tt, tl), (vt, vl) = separable_tokens(400, 0), separable_tokens(200, 1)
    result = partial_finetune_probe(tt, tl, vt, vl, encoder, 4, epochs=8, batch_size=32, lr=3e-3)
    assert result["top1"] >= 95.0 and result["train_top1"] >= 95.0, result
    assert result == partial_finetune_probe(tt, tl, vt, vl, encoder, 4, epochs=8, batch_size=32, lr=3e-3)
    # Tokens that carry nothing of their labels: held-out accuracy is chance (25% +- 1.4%).
    g = torch.Generator().manual_seed(5)
    noise, queries = torch.randn(400, 17, 32, generator=g), torch.randn(1000, 17, 32, generator=g)
    labels, truth = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    chance = partial_finetune_probe(noise, labels, queries, truth, encoder, 4, epochs=8, batch_size=32, lr=3e-3)
    assert 19.0 <= chance["top1"] <= 31.0, chance
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_balanced_subset_keeps_each_class_share_and_is_reproducible():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 10)
    subset = balanced_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[subset]).tolist() == [10, 5, 1]
    assert (subset == balanced_subset(labels, 0.1, seed=0)).all()
    assert not (subset == balanced_subset(labels, 0.1, seed=1)).all()
    assert np.bincount(labels[balanced_subset(labels, 0.01, 0)]).tolist() == [1, 1, 1]  # at least one each
    assert set(subset) <= set(balanced_subset(labels, 0.5, seed=0))  # nested for one seed
    assert len(balanced_subset(labels, 1.0, 0)) == 160
    with pytest.raises(ValueError, match="unlabelled"):
        balanced_subset(np.array([-1, 0]), 0.5, 0)


def test_subset_source_reads_the_chosen_samples_and_their_labels():
    source = open_source("synthetic", "train", synthetic_size=40, synthetic_image_size=32)
    keep = balanced_subset(source.labels(), 0.2, seed=0)
    part = SubsetSource(source, keep)  # 4 images per class, 20% of them: one each
    assert np.bincount(part.labels(), minlength=10).tolist() == [1] * 10
    for i in range(len(part)):
        assert part.load(i)[1] == source.load(int(keep[i]))[1] == part.labels()[i]


def test_default_layers_are_evenly_spaced_and_end_with_the_last():
    assert default_layers(12) == [3, 6, 9, 12]
    assert default_layers(6) == [2, 3, 5, 6]
    assert default_layers(2) == [1, 2]


def test_load_encoder_reads_every_checkpoint_kind(tmp_path):
    config = tiny_config(layer_norm_eps=1e-6, num_labels=2)  # 2: DeiTConfig's default
    torch.manual_seed(0)
    mim = DeiTForMaskedImageModeling(config)
    mim.save_pretrained(tmp_path / "mim")
    classifier = DeiTForImageClassification(config.copy(num_labels=3))
    classifier.deit.load_state_dict(mim.deit.state_dict(), strict=False)
    classifier.save_pretrained(tmp_path / "cls")
    distilled = DeiTForImageClassificationWithTeacher(config.copy(num_labels=3))
    distilled.deit.load_state_dict(mim.deit.state_dict(), strict=False)
    torch.save(to_timm_state_dict(distilled), tmp_path / "timm.pth")  # timm's distilled DeiT layout
    x = torch.randn(2, 3, 32, 32)
    want = mim.deit(x).last_hidden_state
    for path in ("mim", "cls", "timm.pth"):
        encoder = load_encoder(tmp_path / path, num_heads=4).model  # heads: only the timm file needs them
        assert isinstance(encoder, DeiTModel)
        torch.testing.assert_close(encoder(x).last_hidden_state, want, rtol=1e-4, atol=1e-4)
    sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    inferred = config_from_timm(sd)
    assert (inferred.hidden_size, inferred.num_hidden_layers, inferred.image_size) == (32, 2, 32)
    assert inferred.num_attention_heads == 1  # width / 64, at least one


PROBED = [*TINY, "train.probe_every_steps=8", "probe.bank_images=60", "probe.query_images=30",
          "train.snapshot_epochs=[1]"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pretraining run with the online probe every 8 steps (32 steps in all)."""
    out = tmp_path_factory.mktemp("probe_run")
    result = run("pretrain.py", [f"output_dir={out}", *PROBED])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_online_probe_logs_knn_accuracy_at_its_cadence(pretrained):
    records = [json.loads(line) for line in (pretrained / "log.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [8, 16, 24, 32]
    for r in probes:
        assert 0 <= r["probe_knn_top1"] <= r["probe_knn_top5"] <= 100
        assert r["probe_seconds"] > 0
    assert (pretrained / "tb").is_dir()
    # The last probe saw the final weights (the export): the same vote from features computed here.
    from simmim.config import PretrainConfig, load_config
    from simmim.pretrain import online_probe

    cfg = load_config(PretrainConfig, pretrained / "config.yaml")
    probe = online_probe(cfg)
    encoder = DeiTModel.from_pretrained(pretrained / "export")
    bank, bank_labels = extract_features(encoder, probe.sets["bank"], [2], batch_size=16, num_workers=0)
    queries, labels = extract_features(encoder, probe.sets["queries"], [2], batch_size=16, num_workers=0)
    assert len(bank_labels) == 60 and len(labels) == 30
    want = knn_probe(bank[2], bank_labels, queries[2], labels, num_classes=10)
    assert probes[-1]["probe_knn_top1"] == pytest.approx(want["top1"])
    assert probes[-1]["probe_knn_top5"] == pytest.approx(want["top5"])


def test_a_resumed_run_with_the_online_probe_ends_with_the_same_weights(pretrained, tmp_path):
    """The probe draws no random numbers from the training's generators: stopping after step 12 (between
    two probes) and resuming gives the uninterrupted run's weights, bit for bit."""
    out = tmp_path / "resumed"
    first = run("pretrain.py", [f"output_dir={out}", *PROBED, "train.max_steps=12"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run("pretrain.py", [f"output_dir={out}", *PROBED])
    assert second.returncode == 0 and "resuming from" in second.stdout, second.stderr[-3000:]
    assert_same = torch.testing.assert_close
    want, got = final_weights(pretrained), final_weights(out)
    assert want.keys() == got.keys()
    for key in want:
        assert_same(got[key], want[key], rtol=0, atol=0)


def test_snapshots_are_exports_of_that_epoch(pretrained):
    snapshot = pretrained / "snapshots" / "epoch_1"
    assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()
    assert not (pretrained / "snapshots" / "epoch_1.tmp").exists()
    load_encoder(snapshot)


def test_eval_probe_writes_metrics_for_the_encoder_and_random_init(pretrained, tmp_path):
    out = tmp_path / "probe"
    args = ["--checkpoint", str(pretrained), "--data", "synthetic", "--out", str(out), "--linear-epochs", "5",
            "--train-images", "120", "--val-images", "60"]  # fmt: skip
    result = run("eval_probe.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["layers"] == [1, 2] and m["train_images"] == 120 and m["val_images"] == 60
    for which in ("encoder", "random_init"):
        for probe in ("knn", "linear"):
            for layer in ("1", "2"):
                r = m[which][probe][layer]
                assert 0 <= r["top1"] <= r["top5"] <= 100
        assert list(m[which]["partial"]) == ["2"]  # the last block, trained
        assert 0 <= m[which]["partial"]["2"]["top1"] <= m[which]["partial"]["2"]["top5"] <= 100
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    # The encoder's kNN numbers from features computed here on the same seeded subsets.
    from simmim.data import LabeledImageDataset, eval_transform
    from simmim.data.sources import random_subset

    encoder = load_encoder(pretrained)
    transform = eval_transform(32, mean=encoder.mean, std=encoder.std)
    sets = [
        LabeledImageDataset(random_subset(open_source("synthetic", split), n, seed), transform)
        for split, n, seed in (("train", 120, 0), ("validation", 60, 1))
    ]
    (tf, tl), (vf, vl) = (extract_features(encoder.model, d, [1, 2], num_workers=0) for d in sets)
    for layer in (1, 2):
        assert m["encoder"]["knn"][str(layer)]["top1"] == pytest.approx(
            knn_probe(tf[layer], tl, vf[layer], vl, 10)["top1"]
        )
    cached = sorted((out / "features").iterdir())
    assert len(cached) == 4  # (encoder, random init) x (train, validation)
    again = run("eval_probe.py", args)  # from the cache: the same numbers
    assert again.returncode == 0 and json.loads((out / "metrics.json").read_text())["encoder"] == m["encoder"]
    assert sorted((out / "features").iterdir()) == cached


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/no/such/run"], "does not exist"),
        (["--layers", "9"], "--layers [9]"),
        (["--holdout", "1.5"], "--holdout 1.5"),
    ],
)
def test_eval_probe_bad_input_is_one_line_with_exit_code_2(pretrained, tmp_path, args, message):
    base = {"--checkpoint": str(pretrained), "--data": "synthetic", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = run("eval_probe.py", [x for kv in base.items() for x in kv])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
