"""merge_models: a whole-model merge from a config, streamed from disk to disk."""
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import yaml
from tqdm.auto import tqdm

from neurokern.checkpoint import SIDE_FILES
from neurokern.config import MergeConfig, load_config, parse_size
from neurokern.engine import kernel_warmup, prefetch
from neurokern.engine.adapters import CONFIG as ADAPTER_CONFIG
from neurokern.engine.adapters import AdapterModel, is_adapter
from neurokern.engine.distributed import Ranks, local_device
from neurokern.engine.executor import DERIVED_READERS, Batch, Reader, Stager, _Slots, batches
from neurokern.engine.files import fingerprint, side_files
from neurokern.engine.plan import DEFAULT_BUDGET, OUT_SLOTS, Plan, describe, make_plan, plan_digest
from neurokern.engine.settings import EngineSettings
from neurokern.engine.sources import Model, TensorSource, open_model, stacked, validate
from neurokern.engine.timing import Recorder
from neurokern.engine.writer import (CONFIG_ECHO, STATE, KeptPartialError, ShardWriter, check_shared, done_record,
                                     is_published, load_global, lock_partial, notice, partial_dir, prepare_partial,
                                     publish, recorded_digests, rename, save_global)
from neurokern.errors import NeurokernError
from neurokern.methods import METHODS, Pass, PassContext, check_device
from neurokern.models import ModelSet
from neurokern.ops import nonfinite_later

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GPU_SHARE = 0.7  # default device budget: this share of the GPU memory free at the start


@dataclass
class Result:
    out_dir: Path
    plan: Plan
    seconds: float
    passes: list[str]  # the passes this run made (a resumed run skips what the interrupted one saved)
    peak_device_bytes: int = 0
    stats: dict = field(default_factory=dict)
    bytes_read: int = 0  # input bytes this run read (all ranks)
    shards_reused: int = 0  # finished shards of an interrupted run, kept (all ranks)
    shard_digests: dict[str, str] = field(default_factory=dict)  # discard_output: file -> sha256_tree


def _finite_check(batch: Batch, names: list[str], models: list[TensorSource], host=None,
                  converted: Optional[torch.dtype] = None) -> Callable[[], None]:
    """NaN / Inf is an error naming tensor, model and file. One pass over the unit's tensors, read
    without a host sync on a GPU (neurokern.ops.nonfinite_later, flags into `host`): the returned
    function raises the error; the writer calls it before it writes the unit, and every pass
    before its results are used. It keeps no tensor of the unit alive. converted: the config's
    dtype, to which the tensors were converted after reading (a finite value beyond its range
    became Inf there: the message says so)."""
    items = [(name, i) for name in names for i in range(len(models))]
    positions = nonfinite_later([sd[name] for name in names for sd in [batch.base] + batch.finetuned], host)

    def check() -> None:
        bad = positions()
        if bad:
            name, i = items[bad[0]]
            raise NeurokernError(_nonfinite_message(name, models[i], converted))
    return check


def _nonfinite_message(name: str, model: TensorSource, converted: Optional[torch.dtype]) -> str:
    info = model.tensors[name]
    where = f"tensor {name!r} of {model.label} ({info.file})"
    if converted is not None and info.dtype != converted:  # the stored values, read again (an error path)
        stored = torch.empty(info.nbytes, dtype=torch.uint8)
        model.read_into(info, stored)
        if bool(torch.isfinite(stored.view(info.dtype)).all()):
            kind = str(converted).replace("torch.", "")
            return (f"{where} holds values beyond {kind}'s range, to which the config's dtype converts the inputs; "
                    f"choose a dtype that holds them, or out_dtype: {kind} to convert only the output")
    return f"{where} has non-finite values (NaN or Inf)"


def _then(first: Optional[Callable[[], None]], second: Callable[[], None]) -> Callable[[], None]:
    """One check that runs `first` (the unit's inputs; None where raised already) and then `second`."""
    if first is None:
        return second

    def both() -> None:
        first()
        second()
    return both


def _refuse_misplaced_adapters(cfg: MergeConfig, given: dict[Path, TensorSource]) -> None:
    """A LoRA adapter folder reads as a fine-tuned model: the base_model it was trained on with its
    ΔW added (engine/adapters.py). Where the config gives it no such base, one line says so. A path
    given as a TensorSource is an adapter when the source is one (engine.adapters.AdapterModel)."""

    def adapter(path: Path) -> bool:
        return isinstance(given[path], AdapterModel) if path in given else is_adapter(path)

    merge_first = ("merge it into the model it was trained on first (task_arithmetic with that model as base_model "
                   "and the adapter as the only model)")
    if cfg.stack:
        for path in dict.fromkeys([cfg.base_model, *(path for path, _ in cfg.stack), cfg.last_model]):
            if adapter(path):
                raise NeurokernError(f"config slices: {path} is a LoRA adapter folder ({ADAPTER_CONFIG}); slices take "
                                     f"layers of whole models: {merge_first}")
    elif cfg.base_is_first_model:
        for path in [cfg.base_model, *cfg.models]:
            if adapter(path):
                raise NeurokernError(f"config: {path} is a LoRA adapter folder ({ADAPTER_CONFIG}) and the config has no "
                                     "base_model; an adapter is read on top of the model it was trained on: give that "
                                     "model as base_model")
    elif adapter(cfg.base_model) and not cfg.models:  # a copy of one model (passthrough)
        raise NeurokernError(f"config: {cfg.base_model} is a LoRA adapter folder ({ADAPTER_CONFIG}), the one model "
                             f"the config copies: {merge_first}")
    elif adapter(cfg.base_model):
        raise NeurokernError(f"base_model {cfg.base_model} is a LoRA adapter folder ({ADAPTER_CONFIG}); give the "
                             "model it was trained on, and the adapter under models")


class _Engine:
    def __init__(self, cfg: MergeConfig, out_dir: Path, device: torch.device, budget: Optional[int],
                 host_budget: Optional[int], allow_pickle: bool, progress: Optional[bool], durable: bool = False,
                 host_option: str = "--memory-budget", sources: Sequence[TensorSource] = (),
                 discard: bool = False, settings: EngineSettings = EngineSettings(),
                 recorder: Optional[Recorder] = None):
        self.cfg, self.out_dir, self.device, self.durable = cfg, Path(out_dir), device, durable
        self.settings, self.recorder = settings, recorder or Recorder()
        self.cuda = device.type == "cuda"
        self.discard = discard
        self.spec = METHODS[cfg.method]
        given = {Path(s.path): s for s in sources}  # config paths read from a TensorSource, not from disk
        _refuse_misplaced_adapters(cfg, given)
        if cfg.stack:
            self.base = stacked(cfg.stack, cfg.base_model, cfg.last_model,
                                lambda path: given[path] if path in given else Model(path, f"slices model {path}",
                                                                                      allow_pickle))
        else:
            self.base = (given[cfg.base_model] if cfg.base_model in given
                         else Model(cfg.base_model, "base_model", allow_pickle))
        self.finetuned = [given[p] if p in given else open_model(p, f"models[{i}]", self.base, allow_pickle,
                                                                    settings.adapter_piece_bytes)
                          for i, p in enumerate(cfg.models)]
        self.models = [self.base] + self.finetuned
        validate(self.base, self.finetuned)
        self.T = len(self.finetuned)
        try:
            self.params = self.spec.params(dict(cfg.params), self.T)
        except NeurokernError as exc:
            raise NeurokernError(cfg.in_yaml_terms(str(exc))) from exc
        self.out_dtype = DTYPES[cfg.dtype] if cfg.dtype else None  # the inputs are converted to it
        # what the output is written in: mergekit's out_dtype, else dtype
        written = DTYPES[cfg.out_dtype] if cfg.out_dtype else self.out_dtype
        # up to DERIVED_READERS reader threads may be computing a piece of an adapter's tensor at once
        derived_work = min(settings.read_threads, DERIVED_READERS) * max(m.work_bytes() for m in self.models)
        self.plan = make_plan(self.base, self.T + 1, written, cfg.out_shard_size, budget, host_budget, self.cuda,
                              host_option, self.spec.work_bytes(self.T), derived_work, settings.max_unit_bytes)
        self.digest = plan_digest(cfg.raw, cfg.method, cfg.params, self.models, self.plan)
        self.side_files = side_files([cfg.tokenizer_source or cfg.base_model, cfg.base_model], SIDE_FILES)
        self.extra_files = {}  # name -> text: the base's config.json with the config's changes
        if cfg.config_updates and "config.json" in self.side_files:
            try:
                model_config = json.loads(self.side_files.pop("config.json").read_text())
            except (OSError, ValueError) as exc:
                raise NeurokernError(f"{cfg.base_model / 'config.json'}: cannot read it ({exc})") from exc
            self.extra_files["config.json"] = json.dumps({**model_config, **cfg.config_updates}, indent=2) + "\n"
        if cfg.chat_template is not None:  # it takes priority over a template in tokenizer_config.json
            self.side_files.pop("chat_template.jinja", None)
            self.extra_files["chat_template.jinja"] = cfg.chat_template
        self.prepasses: list[Pass] = self.spec.passes(self.params)
        self.passes = [read for p in self.prepasses for read in p.reads] + ["merge"]
        self.progress = progress
        self.checked: set[int] = set()
        self.finite_checks: dict[int, Callable[[], None]] = {}  # unit index -> raises on NaN / Inf

    # ------------------------------------------------------------------------------------------
    def _bar(self, desc: str, units, ranks: Ranks):
        total = sum(u.in_bytes for u in units)
        disable = (not self.progress) if self.progress is not None else (not sys.stderr.isatty())
        return tqdm(total=total, desc=f"{desc:>9}", unit="B", unit_scale=True, unit_divisor=1000,
                    disable=disable or not ranks.is_main, leave=False, dynamic_ncols=True)

    def _pass(self, desc: str, units, ranks: Ranks, keep: bool):
        bar = self._bar(desc, units, ranks)
        count = [0]

        def tick(batch: Batch):
            count[0] += len(batch.unit.names)
            bar.set_postfix_str(f"{count[0]} tensors", refresh=False)
            bar.update(batch.nbytes)

        self.recorder.section(desc)
        start = time.perf_counter()
        for batch in batches(self.plan, units, self.reader, self.stager, keep=keep, progress=tick):
            if batch.unit.index not in self.checked:
                with self.recorder.span("finite check"):
                    names = self._merge_names(batch)
                    if self.cuda:
                        host = self._pinned_flags(len(names) * len(self.models))
                        self.finite_checks[batch.unit.index] = _finite_check(batch, names, self.models, host,
                                                                             self.out_dtype)
                    else:  # known already: raised before any work on the unit
                        _finite_check(batch, names, self.models, converted=self.out_dtype)()
                self.checked.add(batch.unit.index)
            with self.recorder.span("consumer work (between batches)"):
                yield batch
        with self.recorder.span("finite check"):  # what the writer has not checked
            for check in self.finite_checks.values():
                check()
            self.finite_checks.clear()
        bar.close()
        self.recorder.add("pass (wall)", time.perf_counter() - start)

    def _pinned_flags(self, count: int) -> torch.Tensor:
        """The next `count` int32 flags of the pinned buffer (GPU): no pinning per unit."""
        host, self.finite_host = self.finite_host[:count], self.finite_host[count:]
        return host

    def _merged_check(self, models: ModelSet, merged: dict) -> Callable[[], None]:
        """The check of a unit's merged values (models.check.later), read without a host sync on a
        GPU (its flags into the next piece of the pinned buffer)."""
        host = self._pinned_flags(len(models.names)) if self.cuda else None
        return models.check.later(models.names, merged, host)

    def _merge_names(self, batch: Batch) -> list[str]:
        return [n for n in batch.unit.names if self.plan.tensors[n].merge]

    # ------------------------------------------------------------------------------------------
    def _context(self, units, ranks: Ranks) -> PassContext:
        unit_of = {n: u for u in units for n in u.names}

        def visit(name: str, fn: Callable[[ModelSet], Any]) -> Optional[Any]:
            if name not in unit_of:
                return None
            with closing(batches(self.plan, [unit_of[name]], self.reader, self.stager)) as one:
                batch = next(one)
                return fn(ModelSet(batch.base, batch.finetuned, [name]))

        return PassContext(self.plan.merge_names, self.plan.offsets, self.plan.total_merge_numel, self.T,
                           self.device, ranks.sum_, ranks.max_, visit)

    def _prepasses(self, units, ranks: Ranks, ctx: PassContext) -> dict[str, Any]:
        """Runs the method's whole-model passes over this rank's units; their results by key."""
        results = {}
        for prepass in self.prepasses:
            prepass.begin(ctx, results)
            for i, read in enumerate(prepass.reads):
                for batch in self._pass(read, units, ranks, keep=True):
                    names = self._merge_names(batch)
                    if names:
                        prepass.accumulate(i, ModelSet(batch.base, batch.finetuned, names))
                prepass.reduce(i, ctx)
            results[prepass.key] = prepass.result()
        return results

    # ------------------------------------------------------------------------------------------
    def _fingerprints(self) -> dict[str, list]:
        """engine.files.fingerprint of every input file (a few small reads each, in parallel)."""
        with self.recorder.span("input fingerprints"):
            files = list(dict.fromkeys(f for m in self.models for f in m.files))
            if not files:
                return {}
            with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
                return dict(zip(map(str, files), pool.map(fingerprint, files)))

    def run(self, ranks: Ranks, resume: bool) -> Result:
        start = time.perf_counter()
        partial = partial_dir(self.out_dir)
        if self.out_dir.is_symlink():
            raise NeurokernError(f"output {self.out_dir} is a symbolic link; give the path of the folder to create")
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise NeurokernError(f"output {self.out_dir} exists and is not an empty folder")
        lock, ours = None, False  # ours: this run made the partial folder (or began it afresh)
        try:
            if ranks.is_main:
                try:
                    partial.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise NeurokernError(f"cannot create {partial.parent}: {exc.strerror or exc}") from exc
                lock, ours = lock_partial(partial)
                ours = prepare_partial(partial, self.digest, self._fingerprints, resume) or ours
            ranks.barrier()
            check_shared(partial, ranks, self.digest)
            published = is_published(partial, self.digest)  # stopped just before the rename: only that is left
            ranks.barrier()  # every rank has looked before rank 0 renames
            if published:
                if ranks.is_main:
                    rename(partial, self.out_dir)
                return Result(self.out_dir, self.plan, time.perf_counter() - start, [],
                              shards_reused=len(self.plan.shards))
            return self._run(ranks, partial, start, resume)
        except NeurokernError as exc:
            if ours and not isinstance(exc, KeptPartialError):  # bad input: nothing is left
                shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                os.close(lock)

    def _saved_prepasses(self, partial: Path, ranks: Ranks, ctx: PassContext) -> Optional[dict[str, Any]]:
        """The pre-pass results an interrupted run saved for this plan, or None (none saved, or
        unusable: garbled, or not matching its sha256; a notice says so and they are computed again)."""
        values, problem = load_global(partial, self.digest)
        if values is not None:
            if set(values) == {p.key for p in self.prepasses}:
                try:
                    return {p.key: p.load(values[p.key], ctx) for p in self.prepasses}
                except (KeyError, TypeError, ValueError):
                    pass
            problem = f"{partial / STATE / 'global.json'} does not hold this merge's values"
        if problem and ranks.is_main:
            notice(f"resume: {problem}; computing the global thresholds again")
        return None

    def _run(self, ranks: Ranks, partial: Path, start: float, resume: bool) -> Result:
        plan = self.plan
        my_shards = set(plan.rank_shards(ranks.world)[ranks.rank])
        all_mine = [u for u in plan.units if u.shard in my_shards]
        todo_shards = set()
        for index in sorted(my_shards):
            record, problem = done_record(partial, plan.shards[index], verify=resume)
            if record is None:
                todo_shards.add(index)
                if problem:
                    notice(f"resume: {partial / plan.shards[index].file}: {problem}; writing it again")
        todo = [u for u in all_mine if u.shard in todo_shards]
        passes = []

        est = plan.estimate(self.cuda)
        cache = max(0, plan.device_budget - est["device"] - DEVICE_HEADROOM) if (self.cuda and self.prepasses) else 0
        # every unit is checked once: one flag per (merged tensor, model) for the inputs and one per
        # merged tensor for the merged values, pinned up front (GPU), before the reader pins its
        # buffers (a pinning call waits for the others)
        self.finite_host = (torch.zeros(len(plan.merge_names) * (len(self.models) + 1), dtype=torch.int32,
                                        pin_memory=True) if self.cuda else None)
        self.reader = Reader(plan, self.models, self.device, self.settings, self.recorder)
        self.out_slots: Optional[_Slots] = None  # the merge pass's D2H buffers (GPU)
        self.stager = Stager(self.device, self.out_dtype, cache, self.recorder)
        writer = None
        try:
            pre = {}
            if self.prepasses:
                ctx = self._context(all_mine, ranks)
                pre = self._saved_prepasses(partial, ranks, ctx)
                if pre is None:
                    passes = self.passes[:-1]
                    pre = self._prepasses(all_mine, ranks, ctx)
                    if ranks.is_main:
                        save_global(partial, self.digest, {p.key: p.dump(pre[p.key]) for p in self.prepasses})
            ranks.barrier()
            writer = ShardWriter(partial, plan, sorted(todo_shards), self.durable, self.discard, self.recorder)
            if todo:
                passes.append("merge")
            self._merge(todo, ranks, pre, writer)
            self.recorder.section("end")
            with self.recorder.span("writer drain (last units, last fsync)"):
                writer.close()
            writer = None
        finally:
            if writer is not None:
                writer.abort()
            self.reader.close()
            if self.out_slots is not None:  # the writer is done with them
                self.out_slots.close()
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        counts = ranks.sum_(torch.tensor([self.reader.bytes_read, len(my_shards - todo_shards)], dtype=torch.int64))
        ranks.barrier()
        digests = {}
        if ranks.is_main and self.discard:  # nothing to publish: the digests, and no folder left
            digests = recorded_digests(partial, plan)
            shutil.rmtree(partial, ignore_errors=True)
        elif ranks.is_main:
            echo = {**self.extra_files, CONFIG_ECHO: yaml.safe_dump(self.cfg.raw, sort_keys=False)}
            from neurokern import __version__
            manifest = {"neurokern": __version__, "method": self.cfg.method,
                        "parameters": json.loads(json.dumps(self.cfg.params, default=str)),
                        "inputs_digest": self.digest, "tensors": len(plan.tensors),
                        "total_size": plan.total_out_bytes}
            with self.recorder.span("publish"):
                publish(partial, self.out_dir, plan, self.side_files, echo, manifest, self.durable)
        bytes_read, reused = counts.tolist()
        return Result(self.out_dir, plan, time.perf_counter() - start, passes, peak, bytes_read=bytes_read,
                      shards_reused=reused, shard_digests=digests)

    def _merge(self, units, ranks: Ranks, pre: dict[str, Any], writer: ShardWriter) -> None:
        out_slots = None
        if self.cuda:
            cap = max((u.out_bytes for u in units), default=0) + 16 * max((len(u.names) for u in units), default=0)
            out_slots = self.out_slots = _Slots(OUT_SLOTS + 1, cap, "output buffers", self.device, self.recorder)
        stop = threading.Event()
        kernels = "kernels, first unit (incl. Triton compiling or loading)"
        for batch in self._pass("merge", units, ranks, keep=False):
            names = self._merge_names(batch)
            with self.recorder.span(kernels):
                models = ModelSet(batch.base, batch.finetuned, names)  # its inputs checked by _pass
                merged = self.spec.run(models, self.params, False, pre) if names else {}
                if self.recorder.enabled and self.cuda:
                    torch.cuda.synchronize(self.device)  # the kernels' time, not their launches'
            kernels = "kernels, other units"
            outputs = {n: merged[n] if n in merged else batch.base[n] for n in batch.unit.names}
            outputs = {n: t if t.dtype == self.plan.tensors[n].dtype else t.to(self.plan.tensors[n].dtype)
                       for n, t in outputs.items()}
            self.stager.cache.pop(batch.unit.index, None)
            # the merged values as written (a float32 merge written as float16 may overflow there)
            check = _then(self.finite_checks.pop(batch.unit.index, None),
                          self._merged_check(models, {n: outputs[n] for n in names}))
            if not self.cuda:
                with self.recorder.span("wait for writer"):
                    writer.put({n: t if n in merged else t.clone() for n, t in outputs.items()}, check=check)
                continue
            with self.recorder.span("wait for writer"):
                slot = out_slots.get(stop, check=writer.check)
            views, offset = {}, 0
            for n, t in outputs.items():
                nbytes = t.numel() * t.element_size()
                view = slot[offset:offset + nbytes]
                offset += nbytes + (-nbytes % 16)
                views[n] = view.view(t.dtype).view(t.shape) if nbytes else torch.empty(t.shape, dtype=t.dtype)
                views[n].copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            with self.recorder.span("wait for writer"):
                writer.put(views, wait=event.synchronize, release=lambda s=slot: out_slots.put(s), check=check)


# Device memory the plan's estimate leaves out (trim histograms, launch tables, the allocator's
# rounding): the cache of device batches for later passes leaves it free.
DEVICE_HEADROOM = 256 * 2**20


@contextmanager
def _gpu_memory_cap(device: torch.device, plan: Plan):
    """Holds the caching allocator of a GPU to what it had reserved plus the budget while the merge
    runs (it gives cached blocks back before passing that): the plan keeps the merge's live
    tensors within the budget, this keeps the allocator's cache there too. A budget too small for
    the largest tensor is exceeded by the plan's estimate (and the headroom), as before."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_per_process_memory_fraction(device)
    total = torch.cuda.get_device_properties(device).total_memory
    need = plan.estimate(cuda=True)["device"] + DEVICE_HEADROOM
    cap = (torch.cuda.memory_reserved(device) + max(plan.device_budget, need)) / total
    torch.cuda.set_per_process_memory_fraction(min(before, cap), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)


def merge_models(config: Union[str, Path, dict[str, Any]], out_dir: Union[str, Path], *,
                 device: Optional[str] = None, memory_budget: Union[int, str, None] = None,
                 host_memory_budget: Union[int, str, None] = None, resume: bool = False,
                 dry_run: bool = False, allow_pickle: bool = False, progress: Optional[bool] = None,
                 fsync: bool = False, sources: Sequence[TensorSource] = (), discard_output: bool = False,
                 settings: Optional[EngineSettings] = None, recorder: Optional[Recorder] = None) -> Result:
    """Merge the models a config names (YAML path or dict, mergekit keys) into out_dir, streamed:
    sharded safetensors in and out, host and device memory within memory_budget (default 8 GiB),
    resumable (resume=True finishes an interrupted run byte-identically), one shard set per rank
    under torchrun. The output appears whole by an atomic rename; fsync=True also writes it to
    disk before returning (durable across a power loss). dry_run returns the plan without touching
    out_dir.

    sources: input models that are no folder or file on disk (engine.sources.TensorSource, e.g.
    engine.synthetic): a config path equal to a source's `path` is read from that source.
    discard_output: every shard is merged, copied back to the host and hashed exactly as it would
    be written (the manifest's sha256_tree), and nothing is written: Result.shard_digests holds the
    digests, and out_dir is not created (benchmarks of the pipeline without the output disk).
    It cannot be resumed.
    settings: the engine's settings (threads, piece and unit sizes, warm-up, ranks, timing); by
    default EngineSettings.from_env(), the NEUROKERN_* variables (docs/environment.md).
    recorder: where the merge's blocks are timed (engine.timing.Recorder; NEUROKERN_PROFILE prints
    its figures, NEUROKERN_TRACE writes its timeline when the merge ends); by default a new one from
    settings. The command line passes the one its warm-up reads went to."""
    if settings is None:
        settings = EngineSettings.from_env()
    if recorder is None:
        recorder = Recorder.from_settings(settings)
    recorder.section("start-up")
    recorder.add_process_age("process age at merge_models")
    try:
        with recorder.span("config"):
            cfg = load_config(config)
        if not dry_run and not sources:
            prefetch.start(cfg, settings, recorder, resume)  # already under way when started by the command line
        with recorder.span("device init"):
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dev = local_device(device)
            if not dry_run:
                kernel_warmup.start(dev)
            budget = parse_size(memory_budget, "memory_budget") if memory_budget is not None else None
            host = parse_size(host_memory_budget, "host_memory_budget") if host_memory_budget is not None else None
            check_device(dev)
            if host is None:
                host = budget or DEFAULT_BUDGET
            if budget is None and dev.type == "cuda":  # default: most of the GPU memory free now
                budget = int(DEFAULT_GPU_SHARE * torch.cuda.mem_get_info(dev)[0])
        with recorder.span("headers + plan"):
            host_option = "--host-memory-budget" if host_memory_budget is not None else "--memory-budget"
            if discard_output and resume:
                raise NeurokernError("discard_output merges write nothing to resume from; run without resume")
            engine = _Engine(cfg, Path(out_dir), dev, budget, host, allow_pickle, progress, fsync, host_option,
                             sources, discard_output, settings, recorder)
        if dry_run:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            return Result(Path(out_dir), engine.plan, 0.0, engine.passes,
                          stats={"description": describe(engine.plan, cfg.method, engine.passes, dev.type == "cuda", world)})
        ranks = Ranks.setup(dev, settings)
        try:
            with _gpu_memory_cap(dev, engine.plan):
                return engine.run(ranks, resume)
        finally:
            ranks.close()
    finally:
        prefetch.stop()
        recorder.section("end")
        recorder.add_process_age("process age at the end")
        recorder.report()
