"""Feature classifier for the reference digits, and the Frechet distance built on it.

A small CNN trained once on the train split of :mod:`training.reference.digits` and committed as
``models/reference/digits_classifier.safetensors``. Its penultimate layer (``features``,
64-d, taken before the ReLU so that it is closer to Gaussian) plays the role Inception-v3's
pool features play in FID: quality = Frechet distance between features of generated samples
and of the held-out test split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..paths import REFERENCE_DIR
from .weights_file import read_weights_with_config

DEFAULT_CLASSIFIER_PATH = REFERENCE_DIR / "digits_classifier.safetensors"
DEFAULT_CONFIG = {"in_channels": 1, "widths": [16, 32, 64], "feature_dim": 64, "num_classes": 10, "dropout": 0.3}


class DigitsClassifier(nn.Module):
    """Three conv stages (two 3x3 convs + ReLU, 2x2 max-pool each) -> Linear feature layer -> Linear logits."""

    def __init__(self, in_channels=1, widths=(16, 32, 64), feature_dim=64, num_classes=10, dropout=0.3):
        super().__init__()
        self.config = {"in_channels": in_channels, "widths": list(widths), "feature_dim": feature_dim,
                       "num_classes": num_classes, "dropout": dropout}
        layers, ch = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(ch, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            ch = w
        self.body = nn.Sequential(*layers)
        self.fc_features = nn.Linear(ch * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc_logits = nn.Linear(feature_dim, num_classes)

    def _prepare(self, x):
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"classifier input must be [B, {self.config['in_channels']}, H, W], got {list(x.shape)}")
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 32, 32] images in [-1, 1] -> [B, feature_dim] (penultimate layer, pre-ReLU)."""
        h = self.body(self._prepare(x))
        return self.fc_features(h.flatten(1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_logits(self.dropout(F.relu(self.features(x))))

    forward = logits


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in batches under no_grad and concatenate."""
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred = batched(model.logits, images).argmax(dim=1)
    return float((pred == labels.to(pred.device)).float().mean())


def load_feature_classifier(path=None, device="cpu"):
    """Load the committed classifier: returns (model in eval mode, frozen; metadata dict)."""
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    tensors, meta = read_weights_with_config(
        path, "digits classifier", "python -m training.train_reference --only classifier", device
    )
    model = DigitsClassifier(**meta["config"])
    model.load_state_dict(tensors)
    model.to(device).eval().requires_grad_(False)
    return model, meta


# --------------------------------------------------------------------------- Frechet distance
def psd_sqrt(mat: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    f = torch.as_tensor(feats).detach().cpu().double().numpy() if not isinstance(feats, np.ndarray) \
        else feats.astype(np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    tr((S1 S2)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^{1/2} S2 S1^{1/2} (same spectrum), so no complex parts arise; round-off
    negatives are clipped to zero.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"incompatible statistics: means {mu1.shape}/{mu2.shape}, "
                         f"covariances {sigma1.shape}/{sigma2.shape}")
    s1h = psd_sqrt(sigma1)
    mid = s1h @ sigma2 @ s1h
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))
