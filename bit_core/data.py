"""Feeding images to the model with BiT preprocessing: the training and evaluation transforms
and a dataset over the samples of one split (see :mod:`bit_core.splits`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from bit_core.errors import ConfigError
from bit_core.record import INPUT_MEAN, INPUT_STD
from bit_core.serving import to_rgb
from bit_core.splits import Sample


def train_transform(precrop: int, crop: int, flip: bool = True) -> transforms.Compose:
    """BiT training preprocessing: resize to precrop, random crop, optional flip, scale to [-1, 1]."""
    steps = [transforms.Resize((precrop, precrop)), transforms.RandomCrop((crop, crop))]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(INPUT_MEAN, INPUT_STD)]
    return transforms.Compose(steps)


def eval_transform(crop: int) -> transforms.Compose:
    """BiT evaluation preprocessing: resize straight to the crop size, scale to [-1, 1]."""
    return transforms.Compose([transforms.Resize((crop, crop)), transforms.ToTensor(),
                               transforms.Normalize(INPUT_MEAN, INPUT_STD)])


class ImageListDataset(Dataset):
    """Images listed in a split CSV, decoded as RGB.

    Args:
        root: the data root the CSV paths are relative to.
        samples: the split's samples.
        transform: applied to each PIL image.
        cache: keep decoded images in memory (for small data sets).
    """

    def __init__(self, root: Path, samples: Sequence[Sample], transform=None, cache: bool = False):
        self.root, self.samples, self.transform = Path(root), list(samples), transform
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Image.Image:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        with Image.open(self.root / self.samples[index].path) as handle:
            image = to_rgb(handle)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._image(index)
        return (self.transform(image) if self.transform else image), self.samples[index].label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


# Linux takes at most 107 bytes for a Unix socket's path. DataLoader workers hand each batch over
# through one that multiprocessing makes in the temporary folder (<tmp>/pymp-XXXXXXXX/listener-
# XXXXXXXX, 32 bytes more); with a longer folder every worker fails at its first batch.
_SOCKET_PATH_MAX, _SOCKET_SUFFIX = 107, 32


def check_loader_workers(workers: int) -> None:
    """Fail in one line, before any work, when DataLoader workers cannot start here."""
    base = tempfile.gettempdir()
    size = len(os.fsencode(base))
    if workers > 0 and size + _SOCKET_SUFFIX > _SOCKET_PATH_MAX:
        raise ConfigError(
            f"train.workers={workers} cannot start here: the temporary folder {base} is {size} "
            f"bytes long, over the {_SOCKET_PATH_MAX - _SOCKET_SUFFIX} that leave room for the "
            "Unix sockets of DataLoader workers: set TMPDIR to a shorter path (such as /tmp), "
            "or train.workers=0")
