"""Small in-memory data sets for the training tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Jittered(Dataset):
    """Fixed random images, randomly shifted on every access (uses torch's global RNG)."""

    def __init__(self, n: int = 24, classes: int = 3, size: int = 20):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.labels = torch.arange(n) % classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        return self.images[i, :, dy:dy + 16, dx:dx + 16], int(self.labels[i])
