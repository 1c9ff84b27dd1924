"""A Dot's training loss curve, from its file's metadata: ``python -m training.loss_curve DOT [DOT ...]``.

``train_dot`` keeps the loss (its running mean, every 50 optimizer steps) in the Dot file, since 2026-12-01 the
same of the reuse baseline on the same batches (the loss of reusing the anchor estimate), and since 2026-12-02 the
loss on a fixed tuple set scored every 100 steps (``training/trainer/loop.py``: drawn once, so that curve moves only
because the Dot does). A feature Dot (``--layout feature``, ``training/trainer/rollout.py``) keeps the same three
curves: its loss is relative to reuse's already (the reuse curve is 1), and its fixed set is 8 held-out sampling
runs scored every 50 steps. This prints, for each file, whether the curve is flat over the last fifth of training: the
change a least-squares line fitted there makes across that fifth, relative to its level, with a 90% interval from
the fit's residuals. Flat: the interval holds zero, or lies within +-FLAT_TOLERANCE (a real but negligible slope,
which a noise-free fixed-set curve shows under the cosine schedule's small last learning rates). The curve judged
is, by preference, the fixed-set loss; else the running loss over the reuse baseline where the file has both (the
batches' mix of noise levels moves both alike; the running mean makes neighbouring points correlated, so that
interval is on the narrow side); else the running loss. ``--png`` draws them.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from morse_engine import MorseError, read_dot_info

HISTORY_EVERY = 50  # optimizer steps between the points of a file's loss history (training/trainer/loop.py)
FLAT_TOLERANCE = 0.01  # a fitted change within +-1% of the level over the last fifth counts as flat


@dataclass(frozen=True)
class Trend:
    """The fitted change of the loss across the last fifth of training, relative to its mean there."""

    change: float
    low: float
    high: float
    points: int

    @property
    def flat(self) -> bool:
        return self.low <= 0.0 <= self.high or max(abs(self.low), abs(self.high)) <= FLAT_TOLERANCE


def last_fifth_trend(history: list[float]) -> Trend:
    """Least-squares line through the last fifth of ``history`` (at least 3 points)."""
    n = max(3, round(len(history) / 5))
    if len(history) < n or n < 3:
        raise ValueError(f"a loss history of {len(history)} points is too short to judge its last fifth (3 needed)")
    ys = history[-n:]
    xs = list(range(n))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys)]
    se = (sum(r * r for r in resid) / max(1, n - 2) / sxx) ** 0.5
    span = n - 1
    rel = lambda v: v * span / my  # noqa: E731
    return Trend(rel(slope), rel(slope - 1.645 * se), rel(slope + 1.645 * se), n)


def judged_curve(training: dict) -> tuple[str, list[float]]:
    """The curve the verdict is on: the fixed-set loss, else loss / reuse where the file keeps both, else the loss."""
    fixed = training.get("fixed_set_history") or []
    if len(fixed) >= 4:
        return "fixed-set loss", [loss for _, loss, _ in fixed[1:]]  # not the untrained Dot's point
    loss, reuse = training.get("loss_history") or [], training.get("reuse_loss_history") or []
    if loss and len(reuse) == len(loss):
        return "loss / reuse", [a / b for a, b in zip(loss, reuse)]
    return "loss", list(loss)


def describe(path: Path) -> tuple[dict, str, Trend]:
    training = read_dot_info(path).training
    what, curve = judged_curve(training)
    if not curve:
        raise MorseError(f"'{path.name}' keeps no loss history (made before train_dot recorded one); train it again")
    return training, what, last_fifth_trend(curve)


def plot(rows: list[tuple[Path, dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_ratio, ax_fixed) = plt.subplots(1, 3, figsize=(16, 4))
    for path, training in rows:
        h = training["loss_history"]
        steps = [HISTORY_EVERY * (i + 1) for i in range(len(h))]
        label = f"{path.stem} ({training.get('steps')} steps)"
        (line,) = ax.plot(steps, h, label=label)
        reuse = training.get("reuse_loss_history") or []
        if len(reuse) == len(h):
            ax.plot(steps, reuse, color=line.get_color(), linestyle=":", linewidth=1)
            ax_ratio.plot(steps, [a / b for a, b in zip(h, reuse)], color=line.get_color(), label=label)
        elif training.get("final_reuse_loss"):
            ax.axhline(training["final_reuse_loss"], color=line.get_color(), linestyle=":", linewidth=1)
        fixed = training.get("fixed_set_history") or []
        if fixed:
            ax_fixed.plot([s for s, _, _ in fixed], [a / b for _, a, b in fixed], color=line.get_color(), marker=".",
                          label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean of 50 steps)")
    ax.set_title("Dot loss; dotted: reusing the anchor estimate", fontsize=10)
    ax.legend(fontsize=8)
    ax_ratio.set_xlabel("optimizer step")
    ax_ratio.set_ylabel("loss / reuse loss, same batches")
    ax_ratio.set_title("relative to reuse (files that keep both)", fontsize=10)
    if ax_ratio.lines:
        ax_ratio.legend(fontsize=8)
    ax_fixed.set_xlabel("optimizer step")
    ax_fixed.set_ylabel("loss / reuse loss, fixed set")
    ax_fixed.set_title("on a fixed set of tuples, or of held-out runs for a feature Dot (step 0: untrained)",
                       fontsize=9)
    if ax_fixed.lines:
        ax_fixed.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.loss_curve", description=__doc__.splitlines()[0])
    p.add_argument("dots", type=Path, nargs="+", help="Dot files written by train_dot")
    p.add_argument("--png", type=Path, default=None, help="draw the curves into this PNG")
    args = p.parse_args(argv)
    rows = []
    for path in args.dots:
        try:
            training, what, trend = describe(path)
        except (MorseError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        verdict = "flat" if trend.flat else ("still falling" if trend.high < 0 else "rising")
        print(f"{path.name}: {training.get('steps')} steps, final loss {training.get('final_loss', float('nan')):.5f} "
              f"(reuse {training.get('final_reuse_loss', float('nan')):.5f}); {what} over the last fifth ({trend.points} points): "
              f"{trend.change:+.1%} [{trend.low:+.1%}, {trend.high:+.1%}] -> {verdict}")
        rows.append((path, training))
    if args.png:
        plot(rows, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
