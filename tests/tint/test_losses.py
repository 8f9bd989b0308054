"""The test-time losses on hand-made logits."""
import math

import torch

from neurokern.tint import confidence_mask, entropy, pseudo, pseudo_conf


def test_entropy():
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    # Uniform over 2 classes: log 2; a certain prediction: 0. Mean over rows.
    assert abs(entropy(logits).item() - math.log(2) / 2) < 1e-6
    assert abs(entropy(torch.zeros(3, 4, 5)).item() - math.log(5)) < 1e-6  # [N, ..., C] rows


def test_pseudo_is_cross_entropy_against_the_teacher_argmax():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, 3.0]])  # labels 1, 2
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2]))
    assert torch.equal(pseudo(logits, teacher), want)


def _probs_to_logits(p):
    return torch.tensor(p).log()


def test_confidence_filter_by_hand():
    # Merged model (p_out) and teacher (p_ind), one row each case:
    p_out = [[0.6, 0.3, 0.1],   # 0: agree (argmax 0 both)                          -> keep
             [0.7, 0.2, 0.1],   # 1: disagree, teacher max 0.5 < merged max 0.7        -> drop
             [0.4, 0.35, 0.25],  # 2: disagree, teacher max 0.8 >= merged max 0.4      -> keep
             [0.5, 0.25, 0.25],  # 3: disagree, teacher max 0.5 == merged max 0.5      -> keep
             [0.2, 0.2, 0.6]]    # 4: agree (argmax 2 both), teacher less sure          -> keep
    p_ind = [[0.9, 0.05, 0.05],
             [0.25, 0.5, 0.25],
             [0.1, 0.8, 0.1],
             [0.25, 0.5, 0.25],
             [0.3, 0.3, 0.4]]
    out, ind = _probs_to_logits(p_out), _probs_to_logits(p_ind)
    assert confidence_mask(out, ind).tolist() == [True, False, True, True, True]
    labels = torch.tensor([0, 1, 1, 1, 2])
    ce = torch.nn.functional.cross_entropy(out, labels, reduction="none")
    torch.testing.assert_close(pseudo_conf(out, ind), ce[[0, 2, 3, 4]].mean())


def test_confidence_filter_without_qualifying_disagreements_trains_on_agreeing_rows():
    out = _probs_to_logits([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    ind = _probs_to_logits([[0.8, 0.2], [0.4, 0.6], [0.2, 0.8]])  # row 1 disagrees, 0.6 < 0.9
    assert confidence_mask(out, ind).tolist() == [True, False, True]
    ce = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 1]), reduction="none")
    torch.testing.assert_close(pseudo_conf(out, ind), ce[[0, 2]].mean())


def test_confidence_filter_keeping_nothing_gives_zero_and_no_gradient():
    out = _probs_to_logits([[0.9, 0.1]]).requires_grad_(True)
    ind = _probs_to_logits([[0.4, 0.6]])
    loss = pseudo_conf(out, ind)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(out.grad == 0)


def test_losses_ignore_padded_classes():
    """Heads with fewer classes are padded with -inf in a mixed batch: the padded classes have
    probability 0 and must change neither the losses nor their gradients (0 log 0 = 0, not NaN)."""
    real = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    padded = torch.cat([real, torch.full((2, 2), float("-inf"))], 1).requires_grad_(True)
    for fn in (entropy,):
        value = fn(padded)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(padded.grad).all()
        torch.testing.assert_close(value, fn(real), rtol=0, atol=1e-6)
        torch.testing.assert_close(padded.grad[:, :3], torch.func.grad(fn)(real), rtol=0, atol=1e-6)
        assert torch.all(padded.grad[:, 3:] == 0)
        padded.grad = None
    teacher = torch.cat([torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]), torch.full((2, 2), float("-inf"))], 1)
    for fn in (pseudo, pseudo_conf):
        value = fn(padded, teacher)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(padded.grad).all()
        torch.testing.assert_close(value, fn(real, teacher[:, :3]), rtol=0, atol=1e-6)
        padded.grad = None
