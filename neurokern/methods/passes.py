"""Whole-model passes: what a method needs from the whole model before it merges any part of it
(a global trim threshold, a scale from L1 sums over every tensor, ...).

A method declares its passes (Method.passes: checked params -> new Pass objects). The streaming
engine, which merges a model a unit of tensors at a time, runs them before its merge pass and
hands their results to the method's run as `pre[key]`. On every rank, for each pass in order:

    begin(ctx, pre)             pre: the results of the passes before it, by key
    for i in range(len(reads)):
        accumulate(i, models)   once per unit of this rank's share of the model: a ModelSet of the
                                unit's merged tensors (models.names), in the model's order
        reduce(i, ctx)          once, after the read: combine across ranks (ctx.sum_, ctx.max_)
    result()                    the value handed to run, the same on every rank

Each rank calls the collectives in the same order. The results are saved (dump: a JSON value) in
the partial output, so that a resumed run takes load(dump(result), ctx) instead of reading the
model again. nk.merge runs no pass: a run given pre=None computes what it needs from its models.
"""
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from neurokern.models import ModelSet


@dataclass(frozen=True)
class PassContext:
    """The whole model as the engine sees it, and its collectives (every rank calls them)."""

    names: list[str]  # every merged tensor, in the model's order (the same list on every rank)
    offsets: dict[str, int]  # each one's first flat position in the concatenation of them all
    numel: int  # the entries of all of them
    num_tasks: int
    device: torch.device  # where the tensors of a unit are
    sum_: Callable[[Tensor], Tensor]  # in place, over the ranks; returns the tensor
    max_: Callable[[Tensor], Tensor]  # in place, over the ranks; returns the tensor
    # visit(name, fn): fn(ModelSet of that one tensor, read again) on the rank that holds it; None
    # on the others
    visit: Callable[[str, Callable[[ModelSet], Any]], Optional[Any]]


class Pass:
    """One whole-model pass: `key` names its result (in `pre` and the resume file), `reads` the
    streaming reads of the model it makes (shown as the engine's passes)."""

    key: str
    reads: tuple[str, ...]

    def begin(self, ctx: PassContext, pre: Mapping[str, Any]) -> None:
        pass

    def accumulate(self, read: int, models: ModelSet) -> None:
        raise NotImplementedError

    def reduce(self, read: int, ctx: PassContext) -> None:
        pass

    def result(self) -> Any:
        raise NotImplementedError

    def dump(self, result: Any) -> Any:
        """The result as a JSON value, exact (floats as float.hex)."""
        raise NotImplementedError

    def load(self, data: Any, ctx: PassContext) -> Any:
        """The result back from dump's value; raises KeyError, TypeError or ValueError for a value
        that is not one of this pass's (the engine then runs the pass again)."""
        raise NotImplementedError
