"""Fixtures of the host-free tests; the helpers they use are in ``tiny_models.py``."""
import pytest
import torch

from tiny_models import TinyBackbone


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return TinyBackbone().eval().requires_grad_(False)
