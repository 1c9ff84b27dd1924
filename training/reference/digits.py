"""The reference data set: scikit-learn's handwritten digits, upscaled to 32x32.

Source: ``sklearn.datasets.load_digits()`` -- 1797 grey images of 8x8 pixels with integer
values 0..16 (the UCI "optical recognition of handwritten digits" test set), shipped inside
the scikit-learn package, so nothing is downloaded and nothing is cached on disk.

Preprocessing: values / 16 -> [0, 1], bilinear upscale to 32x32 with
``F.interpolate(mode="bilinear", align_corners=False)``, then ``* 2 - 1`` -> [-1, 1];
one channel: tensors are float32 [N, 1, 32, 32].

Split (fixed, deterministic): ``sklearn.model_selection.train_test_split`` with
``test_size=0.2``, ``stratify=labels``, ``random_state=SPLIT_SEED`` (= 0) over the indices
0..1796, which gives 1437 train and 360 test images, each class in both splits in the
proportions of the whole set (test holds 35 to 37 images of each digit). Each split is returned
in ascending order of the original index.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 32
SPLIT_DESCRIPTION = (f"sklearn load_digits, stratified train_test_split(test_size={TEST_FRACTION}, "
                     f"random_state={SPLIT_SEED}); 8x8 -> {IMAGE_SIZE}x{IMAGE_SIZE} bilinear, [-1, 1]")


@lru_cache(maxsize=1)
def _split_indices() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return {"train": np.sort(train), "test": np.sort(test)}


def split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of the images in ``split`` ("train" or "test"), ascending."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _split_indices()[split].copy()


def upscale_digits(images_8x8: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8] digit images with values 0..16 -> float32 [N, 1, size, size] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images_8x8), dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images float32 [N, 1, 32, 32] in [-1, 1], labels int64 [N]) of ``split``.

    ``split`` is "train" (1437 images) or "test" (360 held-out images); see the module docstring.
    """
    from sklearn.datasets import load_digits

    idx = split_indices(split)  # validates `split`
    digits = load_digits()
    images = upscale_digits(digits.images[idx])
    labels = torch.as_tensor(digits.target[idx], dtype=torch.long)
    return images, labels
