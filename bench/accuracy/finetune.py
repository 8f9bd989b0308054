"""One fine-tuning recipe per family, and evaluation of an encoder with a task head.

Recipe (the text family's values are the defaults, recorded in the results): full fine-tuning of
the encoder plus a new linear head on its features; AdamW (weight decay 0.01), lr 5e-5 for the
encoder and 1e-3 for the head, linear warm-up over 10% of the steps then linear decay, 3 epochs,
batch 32, gradient norm clipped to 1, bf16 autocast on CUDA (fp32 weights); the seed of task i is
seed + i (head init, batch order, dropout).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.accuracy.model import Classifier, new_head


@dataclass
class Recipe:
    lr: float = 5e-5
    head_lr: float = 1e-3
    epochs: float = 3.0
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 1.0
    seed: int = 0

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Task:
    """One task: inputs x[split] (one tensor [N, ...], as the family's encoder takes them) and
    labels y[split] (long [N]) for the splits train, val and test."""
    name: str
    labels: list
    x: dict
    y: dict

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA ("bf16"), or none ("fp32", and always on the CPU)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16") if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)


def finetune(base_encoder: nn.Module, task: Task, recipe: Recipe, seed: int, device) -> dict:
    """Fine-tune a copy of base_encoder and a new head on task's train split.

    Returns {"encoder": fine-tuned encoder module, "head": head module, "log": {...}}."""
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder = copy.deepcopy(base_encoder).to(device).train()
    head = new_head(encoder.hidden_size, task.num_labels, seed).to(device)
    model = Classifier(encoder, head)
    groups = [
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": recipe.lr},
        {"params": list(head.parameters()), "lr": recipe.head_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay, fused=device.type == "cuda")
    x, y = task.x["train"], task.y["train"]
    n = len(y)
    per_epoch = max(1, (n + recipe.batch_size - 1) // recipe.batch_size)
    total = max(1, int(round(recipe.epochs * per_epoch)))
    warm = max(1, int(recipe.warmup * total))

    def lr_factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    step, losses, order = 0, [], torch.empty(0, dtype=torch.long)
    while step < total:
        if not len(order):
            order = torch.randperm(n, generator=gen)
        batch, order = order[: recipe.batch_size], order[recipe.batch_size:]
        with autocast(device):
            loss = F.cross_entropy(model(x[batch].to(device)).float(), y[batch].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        step += 1
    losses = torch.stack(losses).float().cpu()
    tail = max(1, len(losses) // 10)
    encoder.eval()
    log = {"steps": total, "seed": seed, "train_seconds": time.perf_counter() - start,
           "loss_first": float(losses[:tail].mean()), "loss_last": float(losses[-tail:].mean()),
           "head_weight_rms": float(head.weight.detach().float().pow(2).mean().sqrt())}
    return {"encoder": encoder, "head": head.eval(), "log": log}


@torch.no_grad()
def predict(model, x: Tensor, device, batch_size: int = 256, precision: str = "bf16") -> Tensor:
    """Logits (float32, CPU) of model(x) for every row of x, in batches."""
    device = torch.device(device)
    outs = []
    for s in range(0, len(x), batch_size):
        with autocast(device, precision):
            outs.append(model(x[s: s + batch_size].to(device)).float())
    return torch.cat(outs).cpu()


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def evaluate(encoder: nn.Module, heads: Sequence[nn.Module], tasks: Sequence[Task], split: str, device,
             state: Optional[dict] = None, batch_size: int = 256) -> dict:
    """Accuracy per task of one encoder (loaded with `state` first, if given) with each task's head."""
    if state is not None:
        encoder.load_state_dict(state, strict=False)
    encoder.eval()
    return {t.name: accuracy(predict(Classifier(encoder, h), t.x[split], device, batch_size), t.y[split])
            for t, h in zip(tasks, heads)}
