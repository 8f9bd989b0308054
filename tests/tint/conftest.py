"""Small models and synthetic tasks for the neurokern.tint tests.

Tasks: T = 4 classification tasks of C = 4 Gaussian classes, each living in its own 4 of the
D = 16 input dimensions (zeros elsewhere). A shared random "pre-trained" MLP
fc1 -> relu -> fc2 -> relu -> LayerNorm -> head is fine-tuned per task (fc1 and the head; fc2 and
the norm stay pre-trained), so the task vectors of fc1's weight touch disjoint columns while its
bias is shared by all tasks: task arithmetic at 0.3 under-uses every task vector, learning lambda
recovers most of it, and a per-task tint also undoes the shared bias's interference.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

D, H, C, T, N = 16, 32, 4, 4, 400


class Net(nn.Module):
    def __init__(self, classes: int = C, hidden: int = H):
        super().__init__()
        self.fc1 = nn.Linear(D, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.norm(F.relu(self.fc2(F.relu(self.fc1(x))))))


def make_tasks(g: torch.Generator, tasks: int = T, n: int = N):
    """[(train (x, y), test (x, y))] per task."""
    out = []
    sub = D // tasks
    for t in range(tasks):
        means = torch.zeros(C, D)
        means[:, t * sub:(t + 1) * sub] = 2.0 * torch.randn(C, sub, generator=g)

        def sample(k, means=means, t=t):
            y = torch.randint(0, C, (k,), generator=g)
            x = means[y].clone()
            x[:, t * sub:(t + 1) * sub] += torch.randn(k, sub, generator=g)
            return x, y

        out.append((sample(n), sample(n)))
    return out


def finetune(base: nn.Module, x, y, g: torch.Generator, steps: int = 200, lr: float = 1e-2, train=("fc1", "head")):
    m = Net(base.head.out_features)
    m.load_state_dict(base.state_dict())
    opt = torch.optim.Adam([p for n, p in m.named_parameters() if n.startswith(train)], lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def accuracy(predict, tasks) -> float:
    """Mean over tasks of held-out accuracy; predict(x, t) -> logits."""
    with torch.no_grad():
        accs = [(predict(xt, t).argmax(-1) == yt).float().mean().item() for t, (_, (xt, yt)) in enumerate(tasks)]
    return sum(accs) / len(accs)


def random_models(seed: int = 0, tasks: int = 3, noise: float = 0.05, classes: int = C, hidden: int = H):
    """A base Net and `tasks` perturbed copies (no training): for exactness tests."""
    torch.manual_seed(seed)
    base = Net(classes, hidden)
    fts = []
    for _ in range(tasks):
        m = Net(classes, hidden)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn_like(p))
        fts.append(m)
    return base, fts


@pytest.fixture(scope="session")
def tint_kit():
    """Helpers of this directory (the tests import nothing from conftest directly)."""
    return SimpleNamespace(Net=Net, make_tasks=make_tasks, finetune=finetune, accuracy=accuracy,
                           random_models=random_models, D=D, H=H, C=C, T=T)


@pytest.fixture(scope="session")
def synthetic():
    """Seeded tasks, a base model and one fine-tuned model per task (about 1 s on one core)."""
    seed = 3  # see test_ordering.py for the other seeds
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tasks = make_tasks(g)
    base = Net()
    finetuned = [finetune(base, x, y, g) for (x, y), _ in tasks]
    return SimpleNamespace(tasks=tasks, base=base, finetuned=finetuned,
                           test_inputs=[xt for _, (xt, _) in tasks])
