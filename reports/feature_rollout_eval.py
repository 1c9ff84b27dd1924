"""Probe for issue 15 (not a tool of the pack): the learned feature-forecast fill of ``feature_rollout_probe.py``
in the pack's own evaluation, beside the Dot and the training-free fills.

    .venv/bin/python reports/feature_rollout_eval.py reports/2026-12-05-feature-rollout/<change>.safetensors \
        --fills dot,extrapolate,forecast_k1,forecast2_k2,learned --samplers euler,dpmpp_2m --no-ablation \
        --out-dir reports/2026-12-05-feature-rollout --runs /tmp/eval-learned --threads 2

Every argument after the change file is ``python -m training.evaluate``'s; the fill joins the evaluation's list
as ``learned`` (N measured by the evaluation like every fill that calls a network). Its records are not tied to
the change file, so give ``--runs`` a folder of its own (or ``--fresh``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_rollout_probe import load_fill  # noqa: E402

import training.evaluate as evaluate  # noqa: E402
from training.evaluation import fills as fills_mod  # noqa: E402
from training.evaluation.fills import LABELS, EvalFill  # noqa: E402
from training.reference.blocks import ReferenceBlocks  # noqa: E402


def main() -> int:
    change_file, argv = Path(sys.argv[1]), sys.argv[2:]
    collect = fills_mod.collect_fills

    def with_learned(models, names=None):
        rest = [n for n in names or [] if n != "learned"] or None
        out = collect(models, rest)
        if names and "learned" in names:
            fill = load_fill(change_file, models, ReferenceBlocks(models.unet))
            out.append(EvalFill("learned", fill))
        return out

    LABELS["learned"] = f"learned feature forecast ({change_file.stem})"
    evaluate.collect_fills = with_learned
    return evaluate.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
