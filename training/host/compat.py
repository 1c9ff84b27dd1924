"""Workarounds for Python environments the training tools meet inside ComfyUI installs."""
from __future__ import annotations

import importlib.util
import logging
import sys


def hide_broken_torchaudio() -> None:
    """Let peft import where torchaudio is installed but broken.

    ComfyUI installs often hold a torchaudio built for another CUDA than their torch; importing
    it raises RuntimeError. ComfyUI logs that and runs without audio nodes, but transformers
    (which peft imports) sees torchaudio installed, imports it and fails, so peft cannot be
    imported at all. Marking torchaudio absent makes transformers skip it; Dot training never
    uses audio. A working or missing torchaudio is left alone.
    """
    if sys.modules.get("torchaudio", False) is None or importlib.util.find_spec("torchaudio") is None:
        return
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        return
    except Exception as exc:  # the CUDA-mismatch RuntimeError, or any other failure while importing it
        sys.modules["torchaudio"] = None
        utils = sys.modules.get("transformers.utils.import_utils")  # already imported (e.g. by ComfyUI): drop its cached answer
        if utils is not None and hasattr(getattr(utils, "is_torchaudio_available", None), "cache_clear"):
            utils.is_torchaudio_available.cache_clear()
        logging.getLogger("morse").warning("torchaudio cannot be imported (%s); training goes on without it", str(exc).splitlines()[0])
