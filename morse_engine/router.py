"""Route every model call of a sampling run to Dash or to the filler (the Dot).

The router sits at the diffusion-model boundary: it sees the model's scaled input, its
native timestep and the sigma of the call, and returns a native prediction. So any sampler
and scheduler works unchanged. Per run it:

* resolves the schedule for the run's step count (``sample_sigmas`` has steps + 1 entries); an adaptive schedule
  (``adaptive.AdaptiveDash``) is decided at each step's first call instead, from the gate entry's input;
* maps each call to a step by its sigma: a call between two steps (second-order samplers)
  belongs to the step at or above it;
* keeps one anchor per batch entry key (CFG cond and uncond may arrive in one call or in
  separate calls), so every entry is filled from its own latest Dash step;
* runs Dash whenever an entry has no usable anchor (first call, a new cond, a changed batch
  or resolution), so bad timing costs speed, never correctness;
* serves a fill that can decode a span of steps at once (encoder propagation) in one batched call for the
  steps up to the next Dash step, when the host says how a sigma maps to its timestep, and hands each step
  its output as the sampler reaches it (calls between steps are filled one at a time);
* forgets everything when the run ends, also when it raises or is interrupted.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch

from .feature_fills import captured
from .parameterization import on_step, step_at
from .fillers import Anchor, DashCall, Filler, ReuseFiller
from .schedules import DashSchedule, ScheduleSpec


def per_entry_time(timestep, sigma: float, batch: int):
    """The call's timestep where it has one value per batch entry (or one for all), as every UNet and most DiTs
    pass it; else (a per-frame or per-token timestep: Wan 2.2 or LTXV with a denoise mask) the call's sigma per
    entry, so that a fill's times stay one per entry."""
    if not torch.is_tensor(timestep) or timestep.numel() not in (1, batch):
        device = timestep.device if torch.is_tensor(timestep) else None
        return torch.full((batch,), float(sigma), dtype=torch.float32, device=device)
    return timestep


@dataclass
class RunSummary:
    """What one run did, for the log line and for tests."""

    steps: int = 0
    schedule: str = ""
    dash_steps: set = field(default_factory=set)
    dot_steps: set = field(default_factory=set)
    dash_calls: int = 0
    dot_calls: int = 0
    fallback_calls: int = 0  # Dot steps that ran Dash for want of a usable anchor
    probe_calls: int = 0  # fill calls a probing schedule ran to decide a step it then gave to Dash (not charged)
    decoded_ahead: int = 0  # fill calls served from a span decoded in one batched call (parallel decoding)
    dash_seconds: float = 0.0
    dot_seconds: float = 0.0
    filler: str = ""
    why: str = ""  # an adaptive schedule's Dash steps and why each ran Dash ("" for a fixed schedule)

    free_fill: bool = True  # the filler's cost: free, or 1/N LSD a call with N measured

    @property
    def measured_n(self) -> Optional[float]:
        if self.free_fill or not self.dash_calls or not self.dot_calls or self.dot_seconds <= 0:
            return None
        return (self.dash_seconds / self.dash_calls) / (self.dot_seconds / self.dot_calls)

    @property
    def steps_run(self) -> int:
        """Steps the run reached (fewer than ``steps`` when it was interrupted or raised)."""
        return len(self.dash_steps | self.dot_steps)

    def lsd(self, n_speed: Optional[float]) -> float:
        """Steps spent in LSD: a free fill costs nothing, a Dot step 1/N."""
        fills = len(self.dot_steps - self.dash_steps)
        dot_cost = 0.0 if self.free_fill or not n_speed else fills / n_speed
        return len(self.dash_steps) + dot_cost

    def log_line(self, n_speed: Optional[float] = None) -> str:
        """One honest line: the steps each side took, the LSD spent against the plain sampler over the same
        steps, and N only where the fill has a cost (measured in this run, else the Dot file's)."""
        fills = len(self.dot_steps - self.dash_steps)
        ran = self.steps_run
        of = f"of {self.steps}" if ran == self.steps else f"of the {ran} run before it stopped ({self.steps} planned)"
        n = None if self.free_fill else (self.measured_n or n_speed)
        cost = "free" if self.free_fill else (f"N {n:.2f} measured" if self.measured_n else
                                              f"N {n:.2f} from the Dot file" if n else "N unmeasured")
        return (
            f"Morse: {len(self.dash_steps)} Dash steps, {fills} {self.filler} steps {of} "
            f"({self.dash_calls} Dash calls, {self.dot_calls} {self.filler} calls"
            + (f" of which {self.decoded_ahead} decoded ahead in batched calls" if self.decoded_ahead else "")
            + f", {self.fallback_calls} fell back to Dash); "
            f"{self.lsd(n):.2f} LSD spent vs {ran} for the plain sampler; {self.filler} fill {cost}"
            + (f"; Dash at {self.why}" if self.why else "")
        )


class MorseRun:
    """State of one sampling run; create it with :meth:`MorseRouter.run`."""

    def __init__(self, schedule: DashSchedule, sample_sigmas: Sequence[float], filler: Filler, measure: bool, sync,
                 timestep_of: Optional[Callable] = None):
        self.schedule = schedule
        self.sigmas = [float(s) for s in sample_sigmas]
        self.filler = filler
        self.anchors: dict[Hashable, Anchor] = {}
        # All-Dash runs keep no anchors: nothing would read them.
        self.keep_anchors = not schedule.all_dash
        # block outputs the filler needs from each Dash call (hooks exist only during those calls)
        self.capture = filler.capture_modules() if self.keep_anchors else {}
        self.measure = measure
        self.sync = sync
        # sigma -> the model's timestep, for steps decoded ahead of time; None: every fill call runs on its own
        # (always under an adaptive schedule: the steps ahead are not decided yet)
        self.adaptive = getattr(schedule, "adaptive", False)
        self.timestep_of = timestep_of if hasattr(filler, "decode_span") and not self.adaptive else None
        self.gate_key: Optional[Hashable] = None  # the batch entry an adaptive schedule decides from (the first seen)
        self.decoded: dict[tuple, _Decoded] = {}  # (keys, step) -> an output decoded ahead with its span
        self.summary = RunSummary(steps=schedule.steps, schedule=schedule.pattern(), filler=filler.name, free_fill=filler.free)

    def step_of(self, sigma: float) -> int:
        """The step at or above ``sigma`` (sigmas descend)."""
        return step_at(self.sigmas, sigma)

    def _usable_anchors(self, keys, chunks) -> Optional[list[Anchor]]:
        found = []
        for key, chunk in zip(keys, chunks):
            anchor = self.anchors.get(key)
            if anchor is None or anchor.x.shape != chunk.shape or anchor.x.device != chunk.device:
                return None
            if self.capture and (anchor.features is None or set(anchor.features) != set(self.capture)):
                return None
            found.append(anchor)
        return found

    def _timed(self, fn):
        if not self.measure:
            return fn(), 0.0
        if self.sync:
            self.sync()
        start = time.perf_counter()
        out = fn()
        if self.sync:
            self.sync()
        return out, time.perf_counter() - start

    def __call__(
        self,
        dash: Callable,
        x: torch.Tensor,
        timestep: torch.Tensor,
        sigma: float,
        keys: Optional[Sequence[Hashable]] = None,
        context=None,
        fill_backbone: Optional[Callable] = None,
        **kwargs,
    ) -> torch.Tensor:
        """One model call. ``dash(x, timestep, context=..., **kwargs)`` is the full model.

        ``keys`` names the equal batch chunks of ``x`` (e.g. cond uuids); one chunk if None.
        ``fill_backbone``: how a fill calls the backbone for its own inner calls (the Dot's low-resolution
        call), where that must differ from a Dash step's call (a host keeps it away from other packs' wrappers).
        """
        step = self.step_of(sigma)
        t = per_entry_time(timestep, sigma, x.shape[0])  # what the fills and the anchors keep of the timestep
        keys = list(keys) if keys else [None]
        n_chunks = len(keys) if x.shape[0] % len(keys) == 0 else 1
        keys = keys if n_chunks == len(keys) else [tuple(keys)]
        s = self.summary

        gate = self._gate_index(keys) if self.adaptive else None
        if not self._runs_dash(step, sigma, x, n_chunks, gate):
            chunks = x.chunk(n_chunks) if n_chunks > 1 else (x,)
            # a fill that calls the model at this call's timestep cannot serve one the fills keep as sigmas
            servable = self.filler.accepts(kwargs) and (t is timestep or not self.filler.runs_backbone)
            anchors = self._usable_anchors(keys, chunks) if servable else None
            if anchors is not None and self._probing(step, gate):
                # a probing schedule (TeaCache, First Block Cache) decides from what the fill computes on the way
                (out, signal), secs = self._timed(
                    lambda: self.filler.probe(fill_backbone or dash, x, t, _stack(anchors), context, kwargs, sigma=sigma,
                                              step=step))
                if not self.schedule.confirm(step, sigma, _chunk(signal, n_chunks, gate)):
                    s.dot_calls += 1
                    s.dot_seconds += secs
                    s.dot_steps.add(step)
                    return out
                # Dash after all. Not charged: the probe is the start of the full call, which the peers' own code
                # continues from (here the Dash call below computes it again)
                s.probe_calls += 1
            elif anchors is not None:
                anchor = _stack(anchors)
                if self._spans(step, sigma, kwargs):
                    out, secs = self._timed(lambda: self._span_fill(keys, anchors, anchor, x, t, context, kwargs, step))
                else:
                    at = {"step": step} if getattr(self.filler, "step_indexed", False) else {}
                    out, secs = self._timed(
                        lambda: self.filler(fill_backbone or dash, x, t, anchor, context, kwargs, sigma=sigma, **at)
                    )
                s.dot_calls += 1
                s.dot_seconds += secs
                s.dot_steps.add(step)
                return out
            else:
                s.fallback_calls += 1
                if gate is not None and self.adaptive:
                    self.schedule.force_dash(step, "no usable anchor")

        features = None
        if self.capture:
            capturing = getattr(self.filler, "capturing", None)  # a host's own recording (DiT block patches)
            with (capturing(kwargs) if capturing else captured(self.capture)) as features:
                out, secs = self._timed(lambda: dash(x, timestep, context=context, **kwargs))
        else:
            out, secs = self._timed(lambda: dash(x, timestep, context=context, **kwargs))
        s.dash_calls += 1
        s.dash_seconds += secs
        s.dash_steps.add(step)
        if self.keep_anchors:
            self._store(keys, x, out, t, step, sigma, features)
        if gate is not None:
            seen = {name: _chunk(f, n_chunks, gate) for name, f in features.items()} if features else None
            self.schedule.observe(_chunk(x, n_chunks, gate), _chunk(out, n_chunks, gate), out, seen)
        return out

    def _probing(self, step: int, gate: Optional[int]) -> bool:
        """Whether this call is the one a probing schedule decides its step from (the gate entry's first call)."""
        return self.adaptive and self.schedule.probes and gate is not None and not self.schedule.confirmed(step)

    def _gate_index(self, keys) -> Optional[int]:
        """Where the adaptive gate's batch entry is in this call (the first key the run saw), None if absent."""
        if self.gate_key is None:
            self.gate_key = keys[0]
        return keys.index(self.gate_key) if self.gate_key in keys else None

    def _runs_dash(self, step: int, sigma: float, x, n_chunks: int, gate: Optional[int]) -> bool:
        if not self.adaptive:
            return self.schedule.is_dash(step)
        if self.schedule.decided(step) or gate is None:  # a step is decided once, from the gate entry
            return self.schedule.is_dash(step)
        return self.schedule.decide(step, sigma, _chunk(x, n_chunks, gate))

    def _spans(self, step: int, sigma: float, kwargs) -> bool:
        """Whether this fill call is on the step grid (not a second-order sampler's call between steps) and may
        be decoded with the rest of its span."""
        if self.timestep_of is None or not self.filler.can_batch(kwargs):
            return False
        return on_step(self.sigmas, step, sigma)

    def _span_fill(self, keys, anchors, anchor, x, timestep, context, kwargs, step):
        signature = (tuple(a.step for a in anchors), x.shape, x.dtype)
        hit = self.decoded.pop((tuple(keys), step), None)
        if hit is not None and hit.signature == signature and hit.same_inputs(context, kwargs):
            self.summary.decoded_ahead += 1
            return hit.out
        span = [step]
        while (len(span) < self.filler.max_parallel and span[-1] + 1 < self.schedule.steps
               and not self.schedule.is_dash(span[-1] + 1)):
            span.append(span[-1] + 1)
        times = [timestep] + [torch.full_like(timestep, float(self.timestep_of(torch.tensor(self.sigmas[j]))))
                              for j in span[1:]]
        outs = self.filler.decode_span(x, times, anchor, context, kwargs)
        for j, out in zip(span[1:], outs[1:]):
            self.decoded[(tuple(keys), j)] = _Decoded(out, signature, context, kwargs.get("y"))
        return outs[0]

    def _store(self, keys, x, out, timestep, step, sigma, features=None):
        n = len(keys)
        # each captured block output split like the batch (the Dash call's own tensors: never changed in place)
        per_key = [dict(zip(features, parts)) for parts in zip(*(v.chunk(n) for v in features.values()))] \
            if features else [None] * n
        t = timestep.reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        depth = self.filler.history
        for key, xc, zc, tc, fc in zip(keys, x.chunk(n), out.chunk(n), t.chunk(n), per_key):
            old = self.anchors.get(key)
            earlier = ()
            if depth and old is not None and old.z.shape == zc.shape:
                # a second call in the same step (second-order samplers) replaces the anchor and keeps the calls
                # before it; a call of a new step pushes the old anchor onto the history
                earlier = (old.earlier if old.step == step else (old.as_call(), *old.earlier))[:depth]
            # Copies, not views: the sampler owns x and out and may reuse their memory.
            self.anchors[key] = Anchor(
                x=xc.detach().clone(),
                z=zc.detach().clone(),
                t=tc.detach().clone(),
                step=step,
                sigma=torch.full((xc.shape[0],), float(sigma), dtype=torch.float32, device=xc.device),
                features=fc,
                earlier=earlier,
            )

    def close(self):
        self.anchors.clear()
        self.decoded.clear()
        if self.adaptive:
            self.summary.schedule, self.summary.why = self.schedule.pattern(), self.schedule.explain()


def _chunk(t: torch.Tensor, n_chunks: int, index: int) -> torch.Tensor:
    return t.chunk(n_chunks)[index] if n_chunks > 1 else t


@dataclass
class _Decoded:
    """An output decoded ahead with its span, and what it was decoded from (served only if those still hold)."""

    out: torch.Tensor
    signature: tuple  # the anchors' steps, the batch shape and dtype
    context: Optional[torch.Tensor]
    y: Optional[torch.Tensor]

    def same_inputs(self, context, kwargs) -> bool:
        return _same(self.context, context) and _same(self.y, kwargs.get("y"))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _stack(anchors: list[Anchor]) -> Anchor:
    if len(anchors) == 1:
        return anchors[0]
    depth = min(len(a.earlier) for a in anchors)  # the history every entry has
    earlier = tuple(DashCall(torch.cat([a.earlier[d].z for a in anchors]), torch.cat([a.earlier[d].t for a in anchors]),
                             _cat_features([a.earlier[d].features for a in anchors]), anchors[0].earlier[d].step)
                    for d in range(depth))
    return Anchor(
        x=torch.cat([a.x for a in anchors]),
        z=torch.cat([a.z for a in anchors]),
        t=torch.cat([a.t for a in anchors]),
        step=min(a.step for a in anchors),
        sigma=torch.cat([a.sigma for a in anchors]) if all(a.sigma is not None for a in anchors) else None,
        features=_cat_features([a.features for a in anchors]),
        earlier=earlier,
    )


def _cat_features(per_anchor: list) -> Optional[dict]:
    if not all(per_anchor):
        return None
    return {k: torch.cat([f[k] for f in per_anchor]) for k in per_anchor[0]}


class MorseRouter:
    """Holds the schedule and filler; each sampling run gets fresh state from :meth:`run`."""

    def __init__(self, schedule: ScheduleSpec, filler: Optional[Filler] = None, measure: bool = True, sync=None,
                 timestep_of: Optional[Callable] = None, percent_to_sigma: Optional[Callable] = None):
        """``percent_to_sigma``: the model's (ComfyUI's ``model_sampling.percent_to_sigma``), where an adaptive
        schedule's window is placed; without it, on the run's own sigmas."""
        self.spec = schedule
        self.filler = filler or ReuseFiller()
        self.timestep_of = timestep_of
        self.percent_to_sigma = percent_to_sigma
        self.measure = measure
        self.sync = sync
        self.last_summary: Optional[RunSummary] = None

    def resolve(self, sample_sigmas) -> DashSchedule:
        if getattr(self.spec, "adaptive", False):  # decided during the run, on the model's noise range
            return self.spec.resolve(len(sample_sigmas) - 1, self.percent_to_sigma, sample_sigmas)
        return self.spec.resolve(len(sample_sigmas) - 1)

    @contextmanager
    def run(self, sample_sigmas):
        """State for one run; dropped when the block exits, however it exits."""
        sigmas = [float(s) for s in (sample_sigmas.tolist() if hasattr(sample_sigmas, "tolist") else sample_sigmas)]
        run = MorseRun(self.resolve(sigmas), sigmas, self.filler, self.measure, self.sync, self.timestep_of)
        try:
            yield run
        finally:
            run.close()
            self.last_summary = run.summary
