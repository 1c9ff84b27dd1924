"""Quality of a run's samples: Frechet distance of classifier features, and trajectory RMSE."""
from __future__ import annotations

import torch

class Quality:
    """FD against the held-out split's classifier features; RMSE against a reference run."""

    def __init__(self, classifier, real_images: torch.Tensor):
        from ..reference.classifier import batched, feature_stats

        self.classifier = classifier
        self._batched, self._stats = batched, feature_stats
        self.real_mu, self.real_cov = feature_stats(batched(classifier.features, real_images))

    def fd(self, images: torch.Tensor) -> float:
        from ..reference.classifier import frechet_distance_from_stats

        feats = self._batched(self.classifier.features, images.clamp(-1, 1).float())
        return frechet_distance_from_stats(*self._stats(feats), self.real_mu, self.real_cov)

    @staticmethod
    def rmse(images: torch.Tensor, reference: torch.Tensor) -> float:
        return float(((images.float() - reference.float()) ** 2).mean().sqrt())


