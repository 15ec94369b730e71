"""The encoder, its pre-training, the per-task heads and the gentle fine-tuning (all seeded, CPU).

As in the task-arithmetic line of work (and the paper's ViT experiments), each task's head is fixed
before fine-tuning: here the pre-trained digit head composed with the task's label map (CLIP's
zero-shot heads play that role in the paper). Fine-tuning then moves the encoder only, so the
pre-trained model, each fine-tuned model and every merge are evaluated with the same heads, and
only encoders are merged.
"""

from __future__ import annotations

import torch
from torch import nn

from .tasks import Split

WIDTH, FEATURES = 512, 128


def encoder() -> nn.Sequential:
    """64 -> 512 -> 512 -> 128 MLP (361,600 parameters), wide enough to hold several tasks."""
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, FEATURES), nn.ReLU())


def _batches(n: int, size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, size):
        yield order[start : start + size]


def pretrain(data: Split, epochs: int, seed: int) -> tuple[dict, nn.Linear]:
    """The base encoder and its digit head, trained on the pre-training task."""
    torch.manual_seed(seed)
    enc, head = encoder(), nn.Linear(FEATURES, 10)
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        for idx in _batches(len(data.y), 64, gen):
            x = (data.x[idx] + 0.05 * torch.randn(data.x[idx].shape, generator=noise)).clamp(0, 1)
            loss = nn.functional.cross_entropy(head(enc(x)), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.requires_grad_(False)
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}, head


class TaskHead(nn.Module):
    """A task's fixed classifier: the pre-trained digit head followed by the task's label map
    (class score = log of the summed probabilities of its digits), defined without the task's data,
    as CLIP's zero-shot heads are defined by class names."""

    def __init__(self, digit_head: nn.Linear, label_of_digit, classes: int):
        super().__init__()
        self.digit_head = digit_head
        mapping = torch.zeros(classes, 10)
        for d in range(10):
            mapping[label_of_digit(d), d] = 1.0
        self.register_buffer("mapping", mapping)

    def forward(self, features):
        probs = torch.softmax(self.digit_head(features), dim=1)
        return torch.log(probs @ self.mapping.T + 1e-9)


def finetune(base: dict, head: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> dict:
    """The encoder fine-tuned on one task with its head frozen (small steps: a small task vector)."""
    torch.manual_seed(seed)
    enc = encoder()
    enc.load_state_dict(base)
    opt = torch.optim.SGD(enc.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in _batches(len(data.y), 32, gen):
            loss = nn.functional.nll_loss(head(enc(data.x[idx])), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


class Evaluator:
    """Accuracy of an encoder state dict on each task's split, with the tasks' fixed heads."""

    def __init__(self, heads: list, splits: list):
        self.heads, self.splits = heads, splits
        self.enc = encoder()

    @torch.no_grad()
    def accuracies(self, state: dict) -> list:
        self.enc.load_state_dict(state)
        return [float((head(self.enc(s.x)).argmax(1) == s.y).float().mean()) for head, s in zip(self.heads, self.splits)]

    def mean(self, state: dict) -> float:
        accs = self.accuracies(state)
        return sum(accs) / len(accs)
