"""Eight competing tasks built from scikit-learn's bundled digits (1,797 real 8x8 images).

Every task sees the same images through its own input transformation and predicts its own label
map, so all of them need the digit features of a shared encoder but pull its weights in different
directions. The pre-training task is the plain digits. Splits are fixed (60/20/20 by a seeded
permutation) and shared by all tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def _quadrants(img):  # swap the 4x4 blocks: top-left <-> bottom-right, top-right <-> bottom-left
    return np.block([[img[4:, 4:], img[4:, :4]], [img[:4, 4:], img[:4, :4]]])


@dataclass(frozen=True)
class Task:
    name: str
    transform: Callable  # 8x8 image -> 8x8 image
    labels: Callable  # digit -> class
    classes: int


TASKS = [
    Task("rot90", lambda x: np.rot90(x, 1), lambda y: y, 10),
    Task("hflip", lambda x: x[:, ::-1], lambda y: y, 10),
    Task("rot180", lambda x: np.rot90(x, 2), lambda y: y, 10),
    Task("quadrants", _quadrants, lambda y: y, 10),
    Task("transpose+3", lambda x: x.T, lambda y: (y + 3) % 10, 10),
    Task("rot270>=5", lambda x: np.rot90(x, 3), lambda y: int(y >= 5), 2),
    Task("vflip-mod3", lambda x: x[::-1, :], lambda y: y % 3, 3),
    Task("shift-parity", lambda x: np.roll(x, 2, axis=1), lambda y: y % 2, 2),
]
PRETRAIN = Task("digits", lambda x: x, lambda y: y, 10)


@dataclass
class Split:
    x: torch.Tensor  # [N, 64] float32 in [0, 1]
    y: torch.Tensor  # [N] int64


def load_splits(seed: int = 0) -> dict:
    """{"train", "val", "test"}: (images [N, 8, 8] in [0, 1], digits [N]) as numpy arrays."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    a, b = int(0.6 * len(order)), int(0.8 * len(order))
    parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    return {name: (images[idx], digits.target[idx]) for name, idx in parts.items()}


def task_split(task: Task, split) -> Split:
    images, digits = split
    x = np.stack([np.ascontiguousarray(task.transform(img)) for img in images]).reshape(len(images), 64)
    y = np.array([task.labels(int(d)) for d in digits])
    return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64))
