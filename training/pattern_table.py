"""The measured best Dash/fill pattern per budget, from an evaluation report into a Dot file: ``python -m training.pattern_table``.

Prints, for one fill of the report, the best pattern per sampler and LSD budget (the distribution metric
where it separates the runs, else trajectory RMSE) next to what the budget planner's rule would choose.
``--write --dot FILE`` puts that table into the Dot file's metadata (its tensors are left as they are), so
an ``auto`` LSD budget with that Dot plans with the measured patterns; ``--clear`` takes it out again.
Write a table only into the Dot the report evaluated: the table says how that Dot behaves.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morse_engine import MorseError, read_dot_info, write_pattern_table

from .evaluation.pattern_table import DEFAULT_METRIC, FALLBACK_METRIC, pattern_table_from_report, rule_against_report
from .paths import REPORTS_DIR


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.pattern_table", description=__doc__.splitlines()[0])
    p.add_argument("--report", type=Path, default=REPORTS_DIR / "evaluation.json", help="an evaluation.json")
    p.add_argument("--fill", default="dot", help="the report's fill whose table to take (default: dot)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"deciding metric (default {DEFAULT_METRIC})")
    p.add_argument("--fallback", default=FALLBACK_METRIC,
                   help=f"metric where the first does not separate the runs from converged (default {FALLBACK_METRIC}; "
                        "'none' for no fallback)")
    p.add_argument("--dot", type=Path, default=None, help="the Dot file to write the table into (with --write/--clear)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write the table into --dot's metadata")
    action.add_argument("--clear", action="store_true", help="remove the table from --dot's metadata")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if (args.write or args.clear) and args.dot is None:
        print("error: --write and --clear need --dot FILE, the Dot the report evaluated", file=sys.stderr)
        return 2
    if args.clear:
        try:
            write_pattern_table(args.dot, None)
        except MorseError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"removed the pattern table from {args.dot}")
        return 0
    fallback = None if args.fallback == "none" else args.fallback
    try:
        report = json.loads(args.report.read_text())
        table = pattern_table_from_report(report, args.fill, args.metric, fallback)
        rows = rule_against_report(report, args.fill, args.metric, fallback)
    except (OSError, ValueError) as exc:
        print(f"error: {args.report}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.fill} in {args.report}: best pattern per budget against the planner's rule")
    for row in rows:
        value = "-" if row["rule_value"] is None else f"{row['rule_value']:.4g}"
        mark = "=" if row["measured"] == row["rule"] else "~" if row["within"] else "x"
        print(f"  {row['sampler']:<16} {row['budget']:>5g} LSD  measured {row['measured']:<5} {row['metric']} "
              f"{row['measured_value']:.4g}   rule {row['rule']:<5} {value}  {mark}")
    same, within = sum(r["measured"] == r["rule"] for r in rows), sum(r["within"] for r in rows)
    print(f"rule = measured at {same} of {len(rows)} budgets (=), within the best's interval at {within} (= or ~)")
    if args.write:
        try:
            write_pattern_table(args.dot, table)
            written = read_dot_info(args.dot).pattern_table
        except MorseError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote the table for {', '.join(written)} into {args.dot}")
    else:
        print(json.dumps(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
