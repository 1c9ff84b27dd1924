"""A DiT's blocks as the block fills see them (``dit_fills.DiTBlocks``), through the block-replace patch convention
of ComfyUI's DiTs: ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` and
``("single_block", i)``, which Flux, Chroma, SD3, Qwen-Image, Wan, HunyuanVideo, LTXV and AuraFlow call in place of
a block with ``(args, {"original_block": ...})`` (as ComfyUI's Skip Layer Guidance does), and which the project's
reference DiT (``training/reference/dit.py``) honours the same way. Nothing replaces a ``forward``: the patches
live in one call's own options and are taken out when it returns. Plain torch and dicts: no ComfyUI import.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

DOUBLE, SINGLE = "double_block", "single_block"
# the attribute names of each family's block lists in ComfyUI 0.8.0: (double-stream, single-stream)
BLOCK_LISTS = (
    ("double_blocks", "single_blocks"),  # Flux, Flux 2, Chroma, HunyuanVideo
    ("double_layers", "single_layers"),  # AuraFlow
    ("joint_blocks", None),  # SD3 / SD3.5 (MMDiT)
    ("transformer_blocks", None),  # Qwen-Image, LTXV
    ("blocks", None),  # Wan 2.1 / 2.2
    # not Kandinsky 5's visual_transformer_blocks: ComfyUI 0.8.0's block_wrap calls them with x= / context=, which
    # their forward does not take, so a patch that runs one raises (its output-space fills work)
)


def block_keys(diffusion_model) -> Optional[list]:
    """The block-replace keys of ``diffusion_model`` in the order its blocks run; None for a class without them."""
    for double, single in BLOCK_LISTS:
        first = getattr(diffusion_model, double, None)
        if isinstance(first, torch.nn.ModuleList) and len(first):
            rest = getattr(diffusion_model, single, None) if single else None
            return [(DOUBLE, i) for i in range(len(first))] + [(SINGLE, i) for i in range(len(rest or ()))]
    return None


def _first_block(diffusion_model) -> Optional[torch.nn.Module]:
    for double, _ in BLOCK_LISTS:
        first = getattr(diffusion_model, double, None)
        if isinstance(first, torch.nn.ModuleList) and len(first):
            return first[0]
    return None


def takes_block_patches(diffusion_model) -> bool:
    """Whether ``diffusion_model`` is a DiT whose blocks ComfyUI's block-replace patches reach (such a model takes a
    ``transformer_options`` per call, where the block fills put their patches)."""
    return block_keys(diffusion_model) is not None


def _streams(out: dict):
    return out["img"], out.get("txt")


class PatchedDiTBlocks:
    """Record and skip a DiT's blocks ``first..last`` (indices into :func:`block_keys`) within one model call."""

    def __init__(self, diffusion_model):
        keys = block_keys(diffusion_model)
        if keys is None:
            raise AttributeError(f"{type(diffusion_model).__name__} has no block list ComfyUI's block-replace patches reach")
        self.keys = keys
        self.first_block = _first_block(diffusion_model)  # the module behind keys[0] (TeaCache reads its modulation)
        self.n_blocks = len(keys)
        self.n_double = sum(kind == DOUBLE for kind, _ in keys)
        self.text_first: Optional[bool] = None  # where single-stream blocks begin: text tokens before the image's?
        self.exit_has_text = True  # whether the block where a skip ends returns a text stream (learnt when recording)

    def accepts(self, kwargs: dict) -> bool:
        # ControlNet residuals are added after blocks a fill skips; another patch on one of the blocks is the
        # user's (Skip Layer Guidance, a model patch): such a call runs Dash
        replaced = ((kwargs.get("transformer_options") or {}).get("patches_replace") or {}).get("dit") or {}
        return kwargs.get("control") is None and not any(key in replaced for key in self.keys)

    @contextmanager
    def _patched(self, kwargs: dict, patches: dict):
        options = kwargs["transformer_options"]  # this call's own copy (ComfyUI copies the options per call)
        saved = options.get("patches_replace")
        replace = dict(saved or {})
        replace["dit"] = {**replace.get("dit", {}), **patches}
        options["patches_replace"] = replace
        try:
            yield
        finally:
            if saved is None:
                options.pop("patches_replace", None)
            else:
                options["patches_replace"] = saved

    @contextmanager
    def recording(self, kwargs: dict, first: int, last: int, state: bool = False, entry: bool = False):
        seen, result = {}, {}
        exit_kind = self.keys[last][0]

        def record(index):
            def block(args, extra):
                if index == first:
                    seen["entry"] = tuple(None if v is None else v.clone() for v in _streams(args))
                if self.keys[index] == (SINGLE, 0):
                    seen["joined"] = args["img"].clone()  # copies: some blocks add to their input in place
                out = extra["original_block"](args)
                if self.keys[index] == (DOUBLE, self.n_double - 1):
                    seen["joined_from"] = tuple(None if v is None else v.clone() for v in _streams(out))
                if index == last:
                    if "joined_from" in seen and self.text_first is None:
                        self.text_first = _text_first(seen["joined"], *seen["joined_from"])
                    if state:  # the streams leaving the block, laid out as a residual is
                        result["state"] = _out_layout(_streams(out), exit_kind).clone()
                    else:
                        self.exit_has_text = _streams(out)[1] is not None  # Wan's blocks take the text, return none
                        start = self.entry_layout(seen["entry"], exit_kind)
                        result["residual"] = _out_layout(_streams(out), exit_kind) - start
                        if entry:
                            result["entry"] = start
                return out

            return block

        watched = {last} if state else {first, last}
        if not state and self.keys[first][0] == DOUBLE and exit_kind == SINGLE:  # how the streams are joined
            watched |= {self.n_double - 1, self.n_double}
        with self._patched(kwargs, {self.keys[i]: record(i) for i in watched}):
            yield result

    @contextmanager
    def watching_first(self, kwargs: dict, signal):
        """While the model call with ``kwargs`` runs, ``signal(args, out)`` of its first block (the block's inputs
        and what it returned, under whatever patch runs it) is kept in the dict yielded under ``"signal"``. Enter it
        inside :meth:`recording` / :meth:`skipping` of the same call: it wraps the patch they put on the block."""
        seen = {}
        options = kwargs["transformer_options"]
        saved = options.get("patches_replace")
        replace = dict(saved or {})
        dit = dict(replace.get("dit", {}))
        inner = dit.get(self.keys[0])

        def watch(args, extra):
            out = inner(args, extra) if inner is not None else extra["original_block"](args)
            seen["signal"] = signal(args, out)
            return out

        dit[self.keys[0]] = watch
        replace["dit"] = dit
        options["patches_replace"] = replace
        try:
            yield seen
        finally:
            if saved is None:
                options.pop("patches_replace", None)
            else:
                options["patches_replace"] = saved

    def entry_layout(self, entry, exit_kind: str) -> torch.Tensor:
        """The streams entering the skipped blocks as one tensor, token for token as the residual is laid out
        (where the skip ends in single-stream blocks: joined as the model joins them)."""
        entry_img, entry_txt = entry
        if entry_txt is None:
            return entry_img
        if exit_kind == SINGLE:
            return torch.cat((entry_txt, entry_img) if self.text_first else (entry_img, entry_txt), dim=1)
        return torch.cat((entry_img, entry_txt), dim=1) if self.exit_has_text else entry_img

    @contextmanager
    def skipping(self, kwargs: dict, first: int, last: int, residual, replace: bool = False):
        """``residual``: a tensor, or a function of the entering streams (``entry_layout``) that gives it, called
        when the skip begins (a learned change that reads the current state)."""
        exit_kind = self.keys[last][0]
        held = {"residual": residual}

        def skip(args, extra):
            return {name: args[name] for name in ("img", "txt") if name in args}

        def begin(args, extra):
            held["residual"] = residual(self.entry_layout(_streams(args), exit_kind))
            return skip(args, extra)

        def add(current, part):
            return part.to(current.dtype) if replace else current + part.to(current.dtype)

        def end(args, extra):
            if callable(held["residual"]) and first == last:
                begin(args, extra)
            r = held["residual"]
            img, txt = args["img"], args.get("txt")
            if exit_kind == SINGLE or txt is None or r.shape[1] == img.shape[1]:
                return {**skip(args, extra), "img": add(img, r)}
            n = img.shape[1]
            return {"img": add(img, r[:, :n]), "txt": add(txt, r[:, n:])}

        patches = {self.keys[i]: skip for i in range(first, last)}
        if callable(residual) and first < last:
            patches[self.keys[first]] = begin
        patches[self.keys[last]] = end
        with self._patched(kwargs, patches):
            yield


def _out_layout(out, exit_kind: str) -> torch.Tensor:
    img, txt = out
    return img if exit_kind == SINGLE or txt is None else torch.cat((img, txt), dim=1)


def _text_first(joined: torch.Tensor, img: torch.Tensor, txt: Optional[torch.Tensor]) -> bool:
    """Whether the single-stream blocks' input is text then image (Flux, Chroma, AuraFlow) or image then text
    (HunyuanVideo), from one Dash call's own tensors."""
    if txt is None:
        return False
    return bool(torch.equal(joined[:, :txt.shape[1]], txt))
