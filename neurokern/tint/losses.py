"""Test-time training losses: logits of the merged (+ tinted) model against nothing (entropy) or
against the task's fine-tuned model, the teacher (pseudo-labels).

Logits are [N, C] or [N, ..., C] (classes last; token or pixel predictions are flattened to rows).
"""
import torch.nn.functional as F
from torch import Tensor

from neurokern.errors import NeurokernError


def _rows(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _check(logits: Tensor, teacher: Tensor) -> None:
    if logits.shape != teacher.shape:
        raise NeurokernError(
            f"the merged model's logits have shape {tuple(logits.shape)} but the teacher's have "
            f"{tuple(teacher.shape)}; the teacher must be the same task's fine-tuned model"
        )


def entropy(logits: Tensor) -> Tensor:
    """AdaMerging: mean over rows of the Shannon entropy of softmax(logits). A class with logit
    -inf (the padding of a head with fewer classes in a mixed batch) has probability 0 and adds
    nothing (0 log 0 = 0), where the plain product would give 0 * -inf = NaN."""
    logp = F.log_softmax(_rows(logits).float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1).mean()


def pseudo(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Tinting (reference `crosspseudo`): cross-entropy against the teacher's argmax."""
    _check(logits, teacher_logits)
    return F.cross_entropy(_rows(logits).float(), _rows(teacher_logits).argmax(-1))


def confidence_mask(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Which rows confidence-based filtering keeps: p_ind = softmax(teacher), p_out = softmax(merged
    model); keep a row when both argmaxes agree, or when they disagree and max p_ind >= max p_out;
    drop it otherwise. (With no disagreeing row that qualifies, the kept rows are exactly the
    agreeing ones, as the spec's parenthesis states.)"""
    _check(logits, teacher_logits)
    p_out = F.softmax(_rows(logits).detach().float(), -1)
    p_ind = F.softmax(_rows(teacher_logits).detach().float(), -1)
    conf_out, arg_out = p_out.max(-1)
    conf_ind, arg_ind = p_ind.max(-1)
    agree = arg_out == arg_ind
    return agree | (~agree & (conf_ind >= conf_out))


def pseudo_conf(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Tinting++ (reference `crosspseudoconf`): cross-entropy against the teacher's argmax, averaged
    over the rows confidence_mask keeps; 0 (with a graph, no gradient) when it keeps none."""
    keep = confidence_mask(logits, teacher_logits)
    rows, labels = _rows(logits).float(), _rows(teacher_logits).argmax(-1)
    per_row = F.cross_entropy(rows, labels, reduction="none")
    kept = keep.to(per_row.dtype)
    # A masked mean without a host sync: sum(kept * ce) / max(count, 1).
    return (per_row * kept).sum() / kept.sum().clamp_min(1.0)


LOSSES = {"entropy": entropy, "pseudo": pseudo, "pseudo_conf": pseudo_conf}


def loss_fn(name: str):
    if name not in LOSSES:
        raise NeurokernError(f"loss must be one of {', '.join(map(repr, LOSSES))}; got {name!r}")
    return LOSSES[name]


def needs_teacher(name: str) -> bool:
    return name != "entropy"


__all__ = ["LOSSES", "confidence_mask", "entropy", "pseudo", "pseudo_conf"]
