"""The demo's offline quality beside the last recorded figures, so a drop is seen.

    .venv/bin/python benchmarks/demo_quality.py                  # the demo pipeline (current stages skipped)
    .venv/bin/python benchmarks/demo_quality.py --run runs/demo  # a finished run's evaluation as it is

Without ``--run`` it runs ``jobs/pipeline.py --config demo`` (with ``--set`` overrides; a
stage whose config and inputs are unchanged is skipped, so on a finished demo run only what
changed reruns, at most the evaluation) and reads the run's ``evaluation/offline.json``.
Each figure of the "Offline quality" table in ``benchmarks/README.md`` ("The demo": NDCG@10 of
each system, B - A, B's distinct brands and categories in the top 10) is printed beside
the recorded one with the difference; the JSON line holds all three per figure. Nothing is
judged: a drop is for the reader to see (read it against the run-to-run spread the README gives).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from baselines import REPO, run_pipeline

README = REPO / "benchmarks" / "README.md"
SECTION = "## The demo"
FIGURES = {
    "popularity": ("popularity", "ndcg@10"),
    "zero-shot retrieval (variant A)": ("retrieval (zero-shot encoder)", "ndcg@10"),
    "fine-tuned retrieval": ("retrieval (fine-tuned encoder)", "ndcg@10"),
    "fine-tuned retrieval + ranker (variant B)": ("fine-tuned retrieval + ranker", "ndcg@10"),
    "B - A": ("b_minus_a", "ndcg@10"),
    "B brands@10": ("fine-tuned retrieval + ranker", "brands@10"),
    "B categories@10": ("fine-tuned retrieval + ranker", "categories@10"),
}
"""The README table's column -> (system of offline.json, figure); ``b_minus_a`` is the paired difference."""
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def recorded(readme: Path = README) -> dict[str, dict[str, float]]:
    """The last recorded figures: the first table of the README's demo section whose header starts with
    ``| task | popularity``, as task -> column -> figure (a cell's first number; its interval is left out)."""
    text = readme.read_text()
    if SECTION not in text:
        raise SystemExit(f"{readme}: no '{SECTION}' section")
    lines = [line.strip() for line in text.split(SECTION, 1)[1].splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("| task | popularity")), None)
    if start is None:
        raise SystemExit(f"{readme}: no '| task | popularity ...' table in '{SECTION}'")
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    table: dict[str, dict[str, float]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        numbers = {name: NUMBER.search(cell) for name, cell in zip(header[1:], cells[1:]) if name in FIGURES}
        table[cells[0]] = {name: float(found.group()) for name, found in numbers.items() if found}
    return table


def measured(evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The same figures from a run's ``offline.json``, task -> column -> figure."""
    table: dict[str, dict[str, float]] = {}
    for task in ("search", "recommend"):
        if task not in evaluation:
            continue
        rows = {**evaluation[task], "b_minus_a": evaluation.get("b_minus_a", {}).get(task, {})}
        table[task] = {name: float(rows[system][figure]) for name, (system, figure) in FIGURES.items()
                       if figure in rows.get(system, {})}
    return table


def compare(now: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (task, figure) measured now: its figure, the recorded one (None if the README has none) and the
    difference."""
    rows = []
    for task, figures in now.items():
        for name, value in figures.items():
            last = before.get(task, {}).get(name)
            rows.append({"task": task, "figure": name, "now": round(value, 4), "recorded": last,
                         "difference": round(value - last, 4) + 0.0 if last is not None else None})  # no -0.0
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--run", type=Path, help="a finished run's directory: read its evaluation, run nothing")
    parser.add_argument("--run-root", type=Path, default=REPO / "runs", help="where the demo run lives")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline config override")
    parser.add_argument("--readme", type=Path, default=README, help="the README whose demo table is the record")
    parser.add_argument("--json", help="also write the JSON line to this file")
    args = parser.parse_args()
    run = args.run
    if run is None:
        run_pipeline("demo", [f"run.root={args.run_root.resolve()}", *args.set])
        run = args.run_root / "demo"
    offline = run / "evaluation" / "offline.json"
    if not offline.exists():
        raise SystemExit(f"{offline}: not there (the run's evaluate stage writes it)")
    rows = compare(measured(json.loads(offline.read_text())), recorded(args.readme))
    print(f"\n{'task':<10} {'figure':<42} {'now':>8} {'recorded':>9} {'difference':>11}")
    for row in rows:
        last = f"{row['recorded']:.4f}" if row["recorded"] is not None else "-"
        delta = f"{row['difference']:+.4f}" if row["difference"] is not None else "-"
        print(f"{row['task']:<10} {row['figure']:<42} {row['now']:>8.4f} {last:>9} {delta:>11}")
    line = json.dumps({"run": str(run), "figures": rows}, sort_keys=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
