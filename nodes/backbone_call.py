"""One call of a diffusion model as ComfyUI's DIFFUSION_MODEL wrapper receives it, whatever the family.

Every family's ``forward`` hands the wrapper chain its own positional signature: the UNet's
``(x, timesteps, context, y, control, transformer_options)``, Flux's ``(x, timestep, context, y, guidance,
ref_latents, control, transformer_options)``, Wan's ``(x, timestep, context, clip_fea, time_dim_concat,
transformer_options)`` with ``control`` among the keywords, and so on. The call is read by binding it to the
signature of the model's own ``_forward`` (``executor.original``), so the input, the timestep and the options are
found by name, and Dash is the same call passed on unchanged: the same positions and keywords, only the input
and timestep swapped for the ones the router gives (on a Dash step, the very same tensors).
"""
from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=64)
def _parameters(function) -> tuple:
    return tuple(inspect.signature(function).parameters.values())


class BackboneCall:
    def __init__(self, executor, args, kwargs):
        self.executor, self.args, self.kwargs = executor, list(args), dict(kwargs)
        original = getattr(executor, "original", None)
        params = _parameters(getattr(original, "__func__", original)) if original is not None else ()
        if params and params[0].name == "self":  # the function of a bound method: its self is not in args
            params = params[1:]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.names = [p.name for p in positional]  # by position
        self.named = {name: value for name, value in zip(self.names, self.args)}
        self.named.update(self.kwargs)
        # the first two parameters are the latent and the timestep in every family ComfyUI 0.8.0 ships
        self.x_name = self.names[0] if self.names else "x"
        self.t_name = self.names[1] if len(self.names) > 1 else "timestep"

    @property
    def x(self):
        return self.named[self.x_name]

    @property
    def timestep(self):
        return self.named[self.t_name]

    @property
    def options(self) -> dict:
        return self.named.get("transformer_options") or {}

    def inputs(self) -> dict:
        """Everything but the latent and the timestep, by name (``context``, ``y``, ``control``, the options,
        the family's own inputs): what the fills and the router read of the call."""
        return {k: v for k, v in self.named.items() if k not in (self.x_name, self.t_name)}

    def dash(self, x, timestep, **_inputs):
        """The model on ``x`` at ``timestep``, every other input as the model passed it (the router hands back
        the call's own inputs; a fill's own backbone calls go through :meth:`backbone_itself`)."""
        return self.executor(*self._args_with(x, timestep), **self._kwargs_with(x, timestep))

    def backbone_itself(self, x, timestep, **inputs):
        """The model's own ``_forward`` past the other DIFFUSION_MODEL wrappers, for a fill's inner call (the
        paper's Dot at 1/2^m resolution): not a sampling step, so EasyCache and the like must not see it."""
        return self.executor.original(x, timestep, **inputs)

    def passed_on(self):
        """The call passed on unchanged, for runs without Morse."""
        return self.executor(*self.args, **self.kwargs)

    def _args_with(self, x, timestep) -> list:
        args = list(self.args)
        for name, value in ((self.x_name, x), (self.t_name, timestep)):
            if name in self.names and self.names.index(name) < len(args):
                args[self.names.index(name)] = value
        return args

    def _kwargs_with(self, x, timestep) -> dict:
        kwargs = dict(self.kwargs)
        for name, value in ((self.x_name, x), (self.t_name, timestep)):
            if name in kwargs:
                kwargs[name] = value
        return kwargs
