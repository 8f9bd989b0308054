"""Exact global trims without holding the model: the k-th largest |tau_t| per task over every
merged tensor, and the exact-k tie limit by global flat position, from streaming passes
(GlobalTrimPass: the whole-model pass of the methods with trim_scope "global").

|tau| is a non-negative float32, so its bit pattern orders it. Pass 1 counts the entries of each
task per high 16 bits of that pattern (a [T, 32768] histogram: the sign bit is 0); the bin holding
the k-th largest entry is then known. Pass 2 counts, inside that bin only, the entries per low 16
bits: that gives the exact threshold value, and how many entries equal to it are kept. When ties
are broken by position (exact_k) and only some tied entries are kept, pass 2 also kept, per tensor,
the counts of the boundary bin's values, so the tensor holding the last kept tied entry is known and
that one tensor is read again to find its position. Histograms are summed across ranks.
The result equals ops.magnitude_threshold over the whole model (tests/engine check it).

Both passes take a unit's tensors at once, through the ops neurokern.ops.key_histogram and
boundary_values (on a GPU Triton kernels: one launch per storage dtype, atomics into the device
histograms, no host sync; on the CPU torch per tensor and task). exact_k's pass 2 reads each unit's
per-tensor boundary-bin counts (one sync per unit), gathers the low bits of those entries on the
device and copies them to pinned memory without waiting; they are unpacked once the pass is over.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from neurokern.methods.method import columns
from neurokern.methods.passes import Pass, PassContext
from neurokern.methods.trim import INT64_MAX, Trims, keep_count, keeps_ties
from neurokern.models import ModelSet
from neurokern.ops import HI_BINS, LO_BINS, boundary_values, key_histogram, magnitude_bits, to_device


def _take_top(hist: list[int], k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry (1-based, k >= 1) and how many entries lie above it."""
    above = 0
    for b in range(len(hist) - 1, -1, -1):
        if above + hist[b] >= k:
            return b, above
        above += hist[b]
    raise AssertionError("k exceeds the entry count")


@dataclass
class GlobalTrim:
    """Streaming exact trims for T tasks; k[t] entries kept per task (ties kept or exact-k)."""

    k: list[int]
    keep_ties: bool
    device: torch.device
    hist: Optional[Tensor] = None
    hi_bin: list[int] = field(default_factory=list)  # boundary bin per task (-1: nothing to find)
    hi_device: Optional[Tensor] = None  # hi_bin, int32 on the device (the kernels read it)
    above: list[int] = field(default_factory=list)
    low: Optional[Tensor] = None
    sparse: dict = field(default_factory=dict)  # (name, t) -> (low values, counts) in the boundary bin
    gathered: list = field(default_factory=list)  # GPU exact_k: per unit, what fills `sparse` after pass 2
    value: list[int] = field(default_factory=list)  # per task: the threshold's bits (-1: keeps nothing)
    threshold: list[float] = field(default_factory=list)
    tie_limit: list[int] = field(default_factory=list)

    @property
    def num_tasks(self) -> int:
        return len(self.k)

    # pass 1 ---------------------------------------------------------------------------------
    def add_hist(self, base: Sequence[Tensor], finetuned: Sequence[Tensor]) -> None:
        """Counts a unit's entries: base [n], finetuned task-major (finetuned[t * n + i])."""
        if self.hist is None:
            self.hist = torch.zeros(self.num_tasks, HI_BINS, dtype=torch.int64, device=self.device)
        key_histogram(base, finetuned, self.hist)

    def finish_hist(self, hist: Tensor) -> None:
        rows = hist.cpu().tolist()
        self.hi_bin, self.above = [], []
        for t, k in enumerate(self.k):
            if k <= 0:
                self.hi_bin.append(-1)
                self.above.append(0)
                continue
            b, above = _take_top(rows[t], k)
            self.hi_bin.append(b)
            self.above.append(above)
        self.hi_device = to_device(torch.tensor(self.hi_bin, dtype=torch.int32), self.device)

    # pass 2 ---------------------------------------------------------------------------------
    def add_low(self, names: list[str], base: Sequence[Tensor], finetuned: Sequence[Tensor]) -> None:
        """Counts a unit's boundary-bin entries (names and base [n], finetuned task-major)."""
        if self.low is None:
            self.low = torch.zeros(self.num_tasks, LO_BINS, dtype=torch.int64, device=self.device)
        if self.keep_ties:
            key_histogram(base, finetuned, self.low, self.hi_device)
            return
        counts = torch.zeros(len(base), self.num_tasks, dtype=torch.int64, device=self.device)
        key_histogram(base, finetuned, self.low, self.hi_device, counts)
        counts = counts.view(-1).tolist()  # the unit's one host sync
        if not any(counts):
            return
        values = boundary_values(base, finetuned, self.hi_device, counts)
        self.gathered.append((list(names), counts, values.to("cpu", non_blocking=True)))  # pinned, no sync

    def _unpack_gathered(self) -> None:
        """`sparse` from the values gathered per (tensor, task): (tensor, task) after (tensor, task)
        in each unit, in any order inside one."""
        if self.gathered and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies to pinned memory are done
        T = self.num_tasks
        for names, counts, host in self.gathered:
            for pair, values in enumerate(host.split(counts)):
                if counts[pair]:
                    self.sparse[(names[pair // T], pair % T)] = torch.unique(values, return_counts=True)
        self.gathered.clear()

    def finish_low(self, low: Tensor) -> list[tuple[int, int]]:
        """Thresholds; returns the (task, rank among tied entries) still needing a tie position."""
        self._unpack_gathered()
        rows = low.cpu().tolist()
        self.threshold, self.tie_limit, self.value, pending = [], [], [], []
        for t, k in enumerate(self.k):
            if self.hi_bin[t] < 0:
                self.threshold.append(float("inf"))
                self.tie_limit.append(0)
                self.value.append(-1)
                continue
            lo, above = _take_top(rows[t], k - self.above[t])
            value = (self.hi_bin[t] << 16) | lo
            self.value.append(value)
            self.threshold.append(torch.tensor(value, dtype=torch.int32).view(torch.float32).item())
            need = k - self.above[t] - above  # tied entries kept, 1 .. rows[t][lo]
            if self.keep_ties or need == rows[t][lo]:
                self.tie_limit.append(INT64_MAX)
            else:
                self.tie_limit.append(-1)
                pending.append((t, need))
        return pending

    def tie_counts(self, names: list[str]) -> Tensor:
        """[len(names), T] entries of each tensor equal to each task's threshold (this rank's share)."""
        out = torch.zeros(len(names), self.num_tasks, dtype=torch.int64)
        for i, name in enumerate(names):
            for t in range(self.num_tasks):
                if (name, t) in self.sparse and self.value[t] >= 0:
                    values, counts = self.sparse[(name, t)]
                    hit = values == (self.value[t] & 0xFFFF)
                    out[i, t] = counts[hit].sum()
        return out

    def locate_ties(self, pending: list[tuple[int, int]], names: list[str], counts: Tensor,
                    offsets: dict[str, int], position: Callable[[str, int, int], Optional[int]]) -> Tensor:
        """Find each pending task's last kept tied entry: the tensor from the summed counts, the
        position inside it from `position(name, t, r)` (the r-th tied entry, 1-based; None when this
        rank does not hold the tensor). Returns this rank's [T] tie limits (0 where not found here)."""
        found = torch.zeros(self.num_tasks, dtype=torch.int64)
        for t, need in pending:
            for i, name in enumerate(names):
                c = int(counts[i, t])
                if need <= c:
                    pos = position(name, t, need)
                    if pos is not None:
                        found[t] = offsets[name] + pos + 1
                    break
                need -= c
        return found

    def set_ties(self, pending: list[tuple[int, int]], found: Tensor) -> None:
        for t, _ in pending:
            self.tie_limit[t] = int(found[t])


def tied_position(base: Tensor, finetuned: Tensor, value: int, r: int) -> int:
    """Flat position of the r-th (1-based) entry whose |tau| bits equal `value`."""
    hits = torch.nonzero(magnitude_bits(base, finetuned) == value).flatten()
    return int(hits[r - 1])


class GlobalTrimPass(Pass):
    """Trims over every merged tensor (trim.Trims of global scope, offsets in the whole model) for
    densities (one per task) under a keep_count rule: a histogram read, a boundary read, and a
    re-read of the one tensor holding a task's last kept tied entry where exact_k needs it."""

    key = "trim"
    reads = ("histogram", "boundary")

    def __init__(self, densities: list[float], rule: str):
        self.densities, self.rule = densities, rule

    def begin(self, ctx: PassContext, pre: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.trim = GlobalTrim([keep_count(ctx.numel, d, self.rule) for d in self.densities], keeps_ties(self.rule),
                               ctx.device)

    def accumulate(self, read: int, models: ModelSet) -> None:
        if read == 0:
            self.trim.add_hist(*columns(models, models.names))
        else:
            self.trim.add_low(models.names, *columns(models, models.names))

    def reduce(self, read: int, ctx: PassContext) -> None:
        trim, T = self.trim, ctx.num_tasks
        if read == 0:
            hist = trim.hist if trim.hist is not None else torch.zeros(T, HI_BINS, dtype=torch.int64, device=ctx.device)
            trim.finish_hist(ctx.sum_(hist))
            return
        low = trim.low if trim.low is not None else torch.zeros(T, LO_BINS, dtype=torch.int64, device=ctx.device)
        pending = trim.finish_low(ctx.sum_(low))
        if pending:
            counts = ctx.sum_(trim.tie_counts(ctx.names))

            def position(name: str, t: int, r: int) -> Optional[int]:
                return ctx.visit(name, lambda one: tied_position(one.base[name], one.finetuned[t][name],
                                                                 trim.value[t], r))

            trim.set_ties(pending, ctx.sum_(trim.locate_ties(pending, ctx.names, counts, ctx.offsets, position)))

    def result(self) -> Trims:
        return self._trims(self.trim.threshold, self.trim.tie_limit, self.ctx)

    def dump(self, result: Trims) -> dict:
        return {"threshold": [float.hex(x) for x in result.threshold.tolist()], "tie_limit": result.tie_limit.tolist()}

    def load(self, data: dict, ctx: PassContext) -> Trims:
        threshold = [float.fromhex(x) for x in data["threshold"]]
        tie_limit = [int(x) for x in data["tie_limit"]]
        if not len(threshold) == len(tie_limit) == ctx.num_tasks:
            raise ValueError("one threshold and tie limit per task expected")
        return self._trims(threshold, tie_limit, ctx)

    @staticmethod
    def _trims(threshold: list[float], tie_limit: list[int], ctx: PassContext) -> Trims:
        return Trims(torch.tensor(threshold, dtype=torch.float32, device=ctx.device),
                     torch.tensor(tie_limit, dtype=torch.int64, device=ctx.device), {}, ctx.offsets)
