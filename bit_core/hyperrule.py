"""The BiT-HyperRule: fine-tuning hyper-parameters as functions of the downstream data set.

Kolesnikov et al. (2019, arXiv:1912.11370), section 3.3: the schedule length depends on the
number of training examples, mixup is used only for larger sets, and the resolution depends on
the image size. Every function is pure; params.yaml may override each result.
"""

from __future__ import annotations

SMALL, MEDIUM = 20_000, 500_000


def get_schedule(dataset_size: int) -> list[int]:
    """Step boundaries: end of warm-up, the decays, and the last step."""
    if dataset_size < SMALL:
        return [100, 200, 300, 400, 500]
    if dataset_size < MEDIUM:
        return [500, 3000, 6000, 9000, 10_000]
    return [500, 6000, 12_000, 18_000, 20_000]


def get_lr(step: int, base_lr: float, batch: int, schedule: list[int]) -> float | None:
    """Learning rate at `step` (0-based); None once the schedule is over.

    base_lr is per 512 images. Linear warm-up to the first boundary, then a tenfold decay after
    every later boundary (a boundary step itself still uses the rate before it, as in the official
    code), stopping at the last.
    """
    lr = base_lr * batch / 512
    warmup, *decays = schedule
    if step < warmup:
        return lr * step / warmup
    if step >= schedule[-1]:
        return None
    for boundary in decays:
        if step <= boundary:
            return lr
        lr /= 10
    return lr


def get_mixup(dataset_size: int) -> float:
    """Mixup alpha: 0.1 from 20k examples up, none below."""
    return 0.0 if dataset_size < SMALL else 0.1


def get_resolution(original: tuple[int, int]) -> tuple[int, int]:
    """(pre-crop resize, crop) from the original image size: small images train at 128 px."""
    height, width = original
    if height * width < 96 * 96:
        return 160, 128
    return 512, 480


def resolve_resolution(original: tuple[int, int], crop: int | None = None,
                       precrop: int | None = None) -> tuple[int, int]:
    """(pre-crop resize, crop) to train at: the rule's, or `crop` / `precrop` where given. A crop
    given without a pre-crop keeps the rule's ratio between the two (160:128 or 512:480); so
    does a pre-crop given without a crop when the rule's crop would not fit in it (a pre-crop
    of 160 on large images crops 150, not 480 out of 160)."""
    rule_precrop, rule_crop = get_resolution(original)
    if precrop and not crop and precrop < rule_crop:
        crop = round(precrop * rule_crop / rule_precrop)
    crop = crop or rule_crop
    return precrop or round(crop * rule_precrop / rule_crop), crop
