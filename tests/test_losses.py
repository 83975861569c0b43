"""SimMIM's masked L1, classification and DeiT distillation losses against values worked out with plain
Python math."""

import math

import pytest
import torch

from simmim.models.losses import classification_loss, distillation_loss, masked_l1

LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
DISTILL_LOGITS = [[0.2, -0.3, 1.5], [2.0, 0.1, -0.4]]
TEACHER = [[0.0, 1.0, 4.0], [3.0, 0.5, 0.0]]  # argmax: 2, 0
LABELS = [1, 2]
SOFT = [[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]


def log_softmax(row, tau=1.0):
    row = [v / tau for v in row]
    log_z = math.log(sum(math.exp(v) for v in row))
    return [v - log_z for v in row]


def ce(logits, labels):
    return sum(-log_softmax(row)[y] for row, y in zip(logits, labels)) / len(logits)


def soft_kl(student, teacher, tau):
    """DeiT: sum_b,c p_t * (log p_t - log p_s) * tau^2 / (B * C)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        log_s, log_t = log_softmax(s_row, tau), log_softmax(t_row, tau)
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t))
    return total * tau * tau / (len(student) * len(student[0]))


def t(x):
    return torch.tensor(x)


def test_cross_entropy():
    # row 0: log(e + e^2 + e^0.5) - 2; row 1: log(1 + e^-1 + e^3) - 3
    expected = (math.log(math.e + math.e**2 + math.e**0.5) - 2 + math.log(1 + math.e**-1 + math.e**3) - 3) / 2
    assert classification_loss(t(LOGITS), t(LABELS)).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(ce(LOGITS, LABELS))


def test_label_smoothing():
    eps = 0.1
    expected = (
        sum(
            (1 - eps) * -ls[y] + eps * sum(-v for v in ls) / 3
            for ls, y in zip(map(log_softmax, LOGITS), LABELS)
        )
        / 2
    )
    loss = classification_loss(t(LOGITS), t(LABELS), label_smoothing=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_cross_entropy():
    expected = sum(sum(-p * ls for p, ls in zip(tr, log_softmax(row))) for row, tr in zip(LOGITS, SOFT)) / 2
    assert classification_loss(t(LOGITS), t(SOFT)).item() == pytest.approx(expected, rel=1e-6)
    # one-hot soft targets are the hard cross-entropy
    one_hot = torch.nn.functional.one_hot(t(LABELS), 3).float()
    assert classification_loss(t(LOGITS), one_hot).item() == pytest.approx(ce(LOGITS, LABELS), rel=1e-6)


def test_single_label_is_mse():
    # ((0.5 - 1)^2 + (2 - 1)^2) / 2
    assert classification_loss(t([[0.5], [2.0]]), t([1.0, 1.0])).item() == pytest.approx(0.625)
    assert classification_loss(t([[0.5], [2.0]]), t([[1.0], [1.0]])).item() == pytest.approx(0.625)


def test_hard_distillation():
    expected = 0.5 * ce(LOGITS, LABELS) + 0.5 * ce(DISTILL_LOGITS, [2, 0])
    loss = distillation_loss(t(LOGITS), t(DISTILL_LOGITS), t(LABELS), t(TEACHER), kind="hard", alpha=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_distillation(tau):
    expected = 0.7 * ce(LOGITS, LABELS) + 0.3 * soft_kl(DISTILL_LOGITS, TEACHER, tau)
    loss = distillation_loss(
        t(LOGITS), t(DISTILL_LOGITS), t(LABELS), t(TEACHER), kind="soft", alpha=0.3, tau=tau
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_distillation_tau_scaling_by_hand():
    # tau = 2 on row [0, 2ln2] vs teacher [2ln2, 0] (one row, C = 2): softened probs (1/3, 2/3) vs (2/3, 1/3)
    # KL = 2/3 ln 2 + 1/3 ln(1/2) = ln(2) / 3; times tau^2 = 4, divided by numel = 2
    s, te = t([[0.0, 2 * math.log(2)]]), t([[2 * math.log(2), 0.0]])
    loss = distillation_loss(s, s, t([0]), te, kind="soft", alpha=1.0, tau=2.0)
    assert loss.item() == pytest.approx(math.log(2) / 3 * 4 / 2, rel=1e-6)


def test_alpha_edges():
    args = (t(LOGITS), t(DISTILL_LOGITS), t(SOFT), t(TEACHER))
    soft_ce = classification_loss(t(LOGITS), t(SOFT)).item()  # labels may be MixUp/CutMix targets
    assert distillation_loss(*args, kind="soft", alpha=0.0).item() == pytest.approx(soft_ce, rel=1e-6)
    assert distillation_loss(*args, kind="hard", alpha=0.0).item() == pytest.approx(soft_ce, rel=1e-6)
    only_teacher = distillation_loss(*args, kind="soft", alpha=1.0, tau=2.0).item()
    assert only_teacher == pytest.approx(soft_kl(DISTILL_LOGITS, TEACHER, 2.0), rel=1e-6)
    assert distillation_loss(*args, kind="hard", alpha=1.0).item() == pytest.approx(
        ce(DISTILL_LOGITS, [2, 0])
    )


def test_no_gradient_into_the_teacher_and_bad_kind():
    cls_logits, distill_logits = t(LOGITS).requires_grad_(), t(DISTILL_LOGITS).requires_grad_()
    teacher = t(TEACHER).requires_grad_()
    distillation_loss(cls_logits, distill_logits, t(LABELS), teacher, kind="soft").backward()
    assert teacher.grad is None and cls_logits.grad is not None and distill_logits.grad is not None
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(t(LOGITS), t(DISTILL_LOGITS), t(LABELS), t(TEACHER), kind="medium")


def test_masked_l1_per_image_and_over_the_batch():
    """|x - r| is 1 in image 0 and 3 in image 1, one channel; the mask covers 4 pixels of image 0 and 2 of
    image 1. Per image: 4/4 and 6/2; over the batch the sums are pooled, (4 + 6) / (4 + 2), not the mean of 1
    and 3. Both with the 1e-5 in the count; an image without masked pixels gives 0."""
    x = torch.zeros(3, 1, 2, 2)
    r = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), -3.0), torch.full((1, 2, 2), 5.0)])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]]).view(3, 1, 2, 2)
    assert masked_l1(x, r, mask).tolist() == pytest.approx([4 / (4 + 1e-5), 6 / (2 + 1e-5), 0.0])
    assert masked_l1(x, r, mask, over_batch=True).item() == pytest.approx(10 / (6 + 1e-5))
    three_channels = masked_l1(x.expand(3, 3, 2, 2), r.expand(3, 3, 2, 2), mask, over_batch=True)
    assert three_channels.item() == pytest.approx(30 / (6 + 1e-5) / 3)  # divided by C
