"""Fixtures of the host tests (helpers in ``comfy_host.py``, imported by that unique name)."""
from comfy_host import dot_folder, host, tiny  # noqa: F401  (pytest fixtures)
