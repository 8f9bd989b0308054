"""The plan of a whole-model merge, decided up front from the headers alone: which tensors are
merged, the output shards (names, tensors, byte layout), the work units (groups of tensors of one
shard, sized for the memory budget), which rank writes which shard, and the memory estimate.
Everything here is a deterministic function of the config and the input headers, so every rank
and a resumed run agree on it."""
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import NAMES, TensorInfo, TensorSource
from neurokern.errors import NeurokernError
from neurokern.ops import STORAGE_DTYPES

DEFAULT_BUDGET = 8 * 2**30
HOST_SLOTS = 3  # input units in flight on the host (read-ahead)
OUT_SLOTS = 2  # merged units waiting for the writer


@dataclass
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    merge: bool  # floating point: merged; otherwise copied from the base


@dataclass
class Shard:
    index: int
    file: str
    names: list[str]
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (start, end) in the data
    header: bytes = b""

    @property
    def nbytes(self) -> int:
        return max((end for _, end in self.layout.values()), default=len(self.header))


@dataclass
class Unit:
    index: int
    shard: int
    names: list[str]
    in_bytes: int  # all models, as stored
    out_bytes: int
    convert_bytes: int = 0  # all models, of the tensors that the config's dtype converts, after conversion


def _shard_header(names: list[str], tensors: dict[str, OutTensor]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    # Wider dtypes first keeps every tensor aligned to its element size (the header is padded to 8).
    order = sorted(names, key=lambda n: -tensors[n].dtype.itemsize)
    header: dict = {"__metadata__": {"format": "pt"}}
    layout, offset = {}, 0
    for n in order:
        t = tensors[n]
        header[n] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        layout[n] = (offset, offset + t.nbytes)
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    return head, {n: (len(head) + a, len(head) + b) for n, (a, b) in layout.items()}


@dataclass
class Plan:
    tensors: dict[str, OutTensor]  # every base tensor, in the base's order
    merge_names: list[str]
    offsets: dict[str, int]  # global flat position of each merged tensor
    shards: list[Shard]
    units: list[Unit]
    num_models: int
    unit_cap: int
    device_budget: int
    host_budget: int
    max_numel: int
    work_bytes: int = 16  # the method's temporaries per element of the tensor it merges (Method.work_bytes)
    derived_work: int = 0  # host memory of the read jobs that compute tensors (LoRA adapters), all at once

    @property
    def total_in_bytes(self) -> int:
        return sum(u.in_bytes for u in self.units)

    @property
    def total_out_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def total_merge_numel(self) -> int:
        return sum(_numel(self.tensors[n].shape) for n in self.merge_names)

    def shard_of(self) -> dict[str, int]:
        return {n: s.index for s in self.shards for n in s.names}

    def rank_shards(self, world: int) -> list[list[int]]:
        """Shards per rank: largest first to the least loaded rank (lowest rank on ties)."""
        load, owned = [0] * world, [[] for _ in range(world)]
        for s in sorted(self.shards, key=lambda s: (-s.nbytes, s.index)):
            r = min(range(world), key=lambda r: (load[r], r))
            load[r] += s.nbytes
            owned[r].append(s.index)
        return [sorted(o) for o in owned]

    def estimate(self, cuda: bool) -> dict[str, int]:
        """Peak bytes. Host: the read-ahead slots, and merged units queued for or being written by
        the writer, and the work of the read jobs that compute tensors. Device: the unit being
        merged and the next one staged, dtype-converted copies, the merged outputs, float32
        temporaries of the largest tensor. On the CPU the device is the host."""
        out_cap = max((u.out_bytes for u in self.units), default=0)
        convert = max((u.convert_bytes for u in self.units), default=0)
        host = HOST_SLOTS * self.unit_cap + (OUT_SLOTS + 1) * out_cap + self.derived_work
        work = convert + out_cap + self.work_bytes * self.max_numel
        if not cuda:
            return {"host": host + work, "device": 0}
        return {"host": host, "device": 2 * self.unit_cap + out_cap + work}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_plan(base: TensorSource, num_models: int, out_dtype: Optional[torch.dtype], out_shard_size: int,
              device_budget: Optional[int] = None, host_budget: Optional[int] = None, cuda: bool = False,
              host_option: str = "--memory-budget", work_bytes: int = 16, derived_work: int = 0,
              max_unit_bytes: int = EngineSettings.max_unit_bytes) -> Plan:
    """host_option: the command-line option that set the host budget (named when it is too small);
    work_bytes: the method's temporaries per element of the largest tensor (Method.work_bytes);
    derived_work: host memory of the read jobs that compute tensors (Plan.derived_work);
    max_unit_bytes: input bytes (all models) of one work unit, unless one tensor needs more
    (EngineSettings.max_unit_bytes)."""
    device_budget = device_budget or DEFAULT_BUDGET
    host_budget = host_budget or device_budget
    tensors, merge_names, offsets, pos = {}, [], {}, 0
    for name, info in base.tensors.items():
        merge = info.dtype.is_floating_point
        dtype = out_dtype if (merge and out_dtype is not None) else info.dtype
        if merge and dtype not in STORAGE_DTYPES:
            raise NeurokernError(f"tensor {name!r} ({info.file}) is {NAMES.get(dtype)}; neurokern merges float32, "
                                 "bfloat16 and float16 tensors (set dtype: in the config to convert)")
        tensors[name] = OutTensor(name, dtype, info.shape, info.numel * dtype.itemsize, merge)
        if merge:
            merge_names.append(name)
            offsets[name] = pos
            pos += info.numel

    # Output shards: greedy in the base's order; a tensor larger than the shard size gets a shard alone.
    groups, current, size = [], [], 0
    for name, t in tensors.items():
        if current and size + t.nbytes > out_shard_size:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += t.nbytes
    if current or not groups:
        groups.append(current)
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    shards = []
    for i, (file, names) in enumerate(zip(files, groups)):
        header, layout = _shard_header(names, tensors)
        shards.append(Shard(i, file, names, layout, header))

    # Work units: consecutive tensors of one shard, up to a cap. The cap starts at max_unit_bytes and is
    # halved until the memory estimate fits the budgets (or no unit holds more than one tensor).
    def in_bytes(info: TensorInfo) -> int:
        return info.nbytes * num_models

    def split(cap: int) -> list[Unit]:
        units: list[Unit] = []

        def unit(shard: Shard, names: list[str], size: int) -> Unit:
            converted = [n for n in names if tensors[n].dtype != base.tensors[n].dtype]
            return Unit(len(units), shard.index, names, size, sum(tensors[n].nbytes for n in names),
                        sum(tensors[n].nbytes for n in converted) * num_models)

        for shard in shards:
            names, size = [], 0
            for name in shard.names:
                b = in_bytes(base.tensors[name])
                if names and size + b > cap:
                    units.append(unit(shard, names, size))
                    names, size = [], 0
                names.append(name)
                size += b
            if names:
                units.append(unit(shard, names, size))
        return units

    biggest = max(base.tensors.values(), key=in_bytes, default=None)
    max_numel = max((base.tensors[n].numel for n in merge_names), default=0)
    cap = max_unit_bytes
    while True:
        units = split(cap)
        unit_cap = max((u.in_bytes for u in units), default=0)
        plan = Plan(tensors, merge_names, offsets, shards, units, num_models, unit_cap, device_budget, host_budget,
                    max_numel, work_bytes, derived_work)
        need = plan.estimate(cuda)
        fits = need["host"] <= host_budget and need["device"] <= device_budget
        if fits or biggest is None or cap <= in_bytes(biggest):
            break
        cap //= 2
    if not fits:
        limits = [(what, budget, option) for what, budget, option in
                  (("host", host_budget, host_option), ("device", device_budget, "--memory-budget")) if need[what] > budget]
        over = [f"{what} ~{human_bytes(need[what])} > {human_bytes(budget)}" for what, budget, _ in limits]
        raise NeurokernError(
            f"memory budget too small: the largest tensor, {biggest.name!r} ({biggest.describe()} in {biggest.file}, "
            f"{num_models} models), needs {' and '.join(over)} with one tensor per work unit; raise "
            + " and ".join(dict.fromkeys(option for _, _, option in limits)))
    return plan


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def plan_digest(config_raw: dict, method: str, params: dict, models: list[TensorSource], plan: Plan) -> str:
    """What the output bytes depend on: config, method parameters, input headers, shard layout."""
    h = hashlib.sha256()
    h.update(json.dumps([config_raw, method, repr(sorted(params.items()))], sort_keys=True, default=str).encode())
    for m in models:
        h.update(json.dumps(m.header_digest()).encode())
    for s in plan.shards:
        h.update(s.file.encode() + s.header)
    return h.hexdigest()


def describe(plan: Plan, method: str, passes: list[str], cuda: bool, world: int) -> str:
    est = plan.estimate(cuda)
    lines = [
        f"tensors: {len(plan.tensors)} ({len(plan.merge_names)} merged, {len(plan.tensors) - len(plan.merge_names)} copied from the base)",
        f"input:   {human_bytes(plan.total_in_bytes)} in {plan.num_models} models; output {human_bytes(plan.total_out_bytes)} in {len(plan.shards)} shard(s)",
        f"units:   {len(plan.units)} work units of at most {human_bytes(plan.unit_cap)} of input",
        f"passes:  {' -> '.join(passes)}",
        f"memory:  host ~{human_bytes(est['host'])} (budget {human_bytes(plan.host_budget)})"
        + (f", device ~{human_bytes(est['device'])} (budget {human_bytes(plan.device_budget)})" if cuda else ""),
    ]
    if world > 1:
        lines.append(f"ranks:   {world}, shards per rank {[len(s) for s in plan.rank_shards(world)]}")
    return "\n".join(lines)
