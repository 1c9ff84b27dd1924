"""Whether a trained feature Dot beats its untrained start, the training-free ``forecast_k`` fill (an untrained
feature Dot is that fill exactly), in the figures a new user can check.

* The held-out runs (``rollout.held_out_error``): their summed end error over reuse's, untrained and trained.
  Mixed samplers, step counts and CFG, and few runs: a noisy figure, and the only one a ComfyUI checkpoint has.
* For the reference model, the figure ``python -m training.compare_fills --dot DOT --fills dot,forecast_k1``
  gives: the share of the reuse-to-Dash RMSE gap each closes at fixed euler step counts (pattern ``D.``), from
  that tool's own functions, on the Dot file just written.

Neither touches a generator of the training: both run after the Dot is written, from their own seeds.
"""
from __future__ import annotations

import time

import torch

from ..request import TrainRequest

SAMPLER, PATTERN, REFERENCE_STEPS = "euler", "D.", 200  # compare_fills' defaults
ORDER_NAMES = {0: "inherit", 1: "forecast", 2: "forecast2"}  # the fill an untrained feature Dot of that order is


def start_name(dot_config) -> str:
    """The training-free fill an untrained feature Dot of ``dot_config`` is (``forecast_k1`` for the default)."""
    return f"{ORDER_NAMES[dot_config.forecast]}_k{dot_config.k}"


def print_verdict(request: TrainRequest, result) -> None:
    """The run's last lines: the held-out figure, for the reference model the fixed-step gaps, and one plain
    sentence saying whether the trained Dot beats its untrained start and by how much."""
    start = start_name(request.settings.dot)
    fixed = result.summary["fixed_history"]
    untrained, trained = fixed[0][1], fixed[-1][1]
    change = trained / untrained - 1 if untrained else float("nan")
    print(f"  held-out runs' end error (summed over {request.settings.fixed_runs} runs, over reuse's): trained "
          f"{trained:.3f}, untrained (= {start}) {untrained:.3f}: {abs(change):.0%} {'lower' if change < 0 else 'higher'}",
          flush=True)
    m = request.measure
    if request.dash.is_checkpoint or m.compare_samples < 1:  # the held-out runs are all a checkpoint's run has
        beats = change < 0
        print(f"The trained Dot {'beats' if beats else 'does NOT beat'} its untrained start ({start}) on the held-out "
              f"runs: their end error is {abs(change):.0%} {'lower' if beats else 'higher'}." + ("" if beats else _HINT))
        return
    print(f"  comparing the trained Dot with {start} at {'/'.join(map(str, m.compare_steps))} {SAMPLER} steps on "
          f"{m.compare_samples} samples, as training.compare_fills does (a few minutes on 2 CPU cores) ...", flush=True)
    t0 = time.perf_counter()
    dot_gaps, start_gaps = fixed_step_gaps(request, start)
    source = f"compare_fills, {m.compare_samples} samples, {time.perf_counter() - t0:.0f} s"
    for line in gap_lines(dot_gaps, start_gaps, start, m.compare_steps, source):
        print(line, flush=True)
    if (sum(dot_gaps) > sum(start_gaps)) != (change < 0):  # the two figures disagree: say which to read how
        c = request.settings
        print(f"  (The two disagree. The {c.fixed_runs} held-out runs mix {' and '.join(c.samplers)}, {c.min_steps}-"
              f"{c.max_steps} steps and CFG {c.cfg_min:g}-{c.cfg_max:g}: few runs, a noisy figure. The fixed-step "
              "comparison is the one compare_fills and the README report.)", flush=True)


_HINT = " Training did not help: train longer (--steps) or on more runs (--rollout-runs)."


def fixed_step_gaps(request: TrainRequest, start: str) -> tuple[list[float], list[float]]:
    """(the trained Dot's, its untrained start's) share of the reuse-to-Dash gap closed at each of the request's
    step counts, as ``compare_fills`` measures them for the Dot file the run wrote (on the CPU, as it does)."""
    from ..compare_fills import compare
    from ..evaluation.fills import EvalFill, collect_fills
    from ..evaluation.workload import default_cfg, load_models, reference_workload

    m = request.measure
    models = load_models(request.dash.weights, request.files.dot, ablation_path=None, device=torch.device("cpu"))
    work = reference_workload(models, m.compare_samples, m.compare_samples, default_cfg(models.dash_meta), 0, "cpu")
    fills = collect_fills(models, ["dot"])
    try:
        fills += collect_fills(models, [start])
    except ValueError:  # a start the engine offers no fill for by name: the untrained Dot itself
        from morse_engine.dot_layouts.feature import fill_for

        from ..host.unet_blocks import blocks_of

        with torch.random.fork_rng():
            untrained = type(models.dot)(models.dot.config).eval()
        fills.append(EvalFill(start, fill_for(untrained, models.unet, blocks_of(models.unet, False))))
    rows = compare(work, fills, SAMPLER, list(m.compare_steps), PATTERN, REFERENCE_STEPS)
    return ([r["fills"]["dot"]["gap_closed"] for r in rows], [r["fills"][start]["gap_closed"] for r in rows])


def gap_lines(dot_gaps: list[float], start_gaps: list[float], start: str, steps, source: str) -> list[str]:
    """The gaps at each step count, and the sentence: better at how many step counts, by how much on average."""
    # compared as printed (two decimals): a difference in the fourth decimal is rounding, not training
    diffs = [round(d, 2) - round(s, 2) for d, s in zip(dot_gaps, start_gaps)]
    better, mean = sum(d > 0 for d in diffs), sum(diffs) / len(diffs)
    slash = lambda values: "/".join(f"{v:.2f}" for v in values)  # noqa: E731
    counts = f"better at {better} of {len(diffs)} step counts"
    if mean > 0 and better == len(diffs):
        sentence = f"The trained Dot beats its untrained start ({start}): {counts}, by {mean:+.2f} on average."
    elif mean > 0:
        sentence = f"The trained Dot beats its untrained start ({start}) on average, by {mean:+.2f}, but is {counts} only."
    else:
        sentence = f"The trained Dot does NOT beat its untrained start ({start}): {counts}, by {mean:+.2f} on average." + _HINT
    return [f"  share of the reuse-to-Dash gap closed at {'/'.join(map(str, steps))} {SAMPLER} steps ({source}): "
            f"trained Dot {slash(dot_gaps)}, its untrained start ({start}) {slash(start_gaps)}", sentence]
