"""Prompt files, captioned image folders, and the safetensors cache of what was encoded from them."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cache_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class TensorCache:
    """A safetensors file of named tensors, read once and rewritten (atomically) when entries were added."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        self.path = path
        self.tensors = load_file(str(path)) if path.is_file() else {}
        self.added = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self.tensors.get(key)

    def put(self, key: str, value: torch.Tensor):
        self.tensors[key] = value.detach().to("cpu").contiguous()
        self.added += 1

    def save(self):
        if not self.added:
            return
        from morse_engine.adapter_file import save_file_atomic

        save_file_atomic(self.tensors, self.path, {"format": "morse-train-cache"})


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts; write one prompt per line (lines starting with # are skipped)")
    return prompts


def find_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs; the caption is ``name.txt`` next to ``name.png`` (empty when there is none)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder; give a folder of images with name.txt captions")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the training images there")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        pairs.append((image, caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""))
    return pairs


def load_image(path: Path, size: int) -> torch.Tensor:
    """[1, size, size, 3] in 0..1 (ComfyUI's IMAGE layout): shorter side scaled to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.LANCZOS)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return (data.float() / 255.0)[None]
