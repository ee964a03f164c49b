"""Categorisation on a trained run: the evaluate stage's top-1 / top-3 figures, and ingest's fill of hidden categories.

    .venv/bin/python benchmarks/categories.py --config demo                 # the demo run (runs/demo)
    .venv/bin/python benchmarks/categories.py --config demo --set run.root=/elsewhere --hide 0.2

Two parts, the run read, never written:

* **held-out products** (:func:`shoprank.evaluation.categories.categorisation_figures`, what the evaluate stage
  records): the products held out of the category loss, each embedded without its category, categorised by the
  run's category head (what ``/categorize`` answers), by the nearest labelled products' vote over the fine-tuned
  and the pretrained vectors, and by the most frequent categories; top-1 and top-3 accuracy;
* **ingest's fill**: ``--hide`` of the run's records' products (seeded) lose their category, and
  :func:`shoprank.encoder.fill.fill_categories` (the ingest stage's step, the pretrained encoder's neighbours)
  predicts them: its accuracy against the hidden truth and its seconds; then the step on the records as they are
  (nothing missing: one column read, nothing embedded), timed ``--repeats`` times in a scratch run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from shoprank.config import Config, load_config  # noqa: E402
from shoprank.encoder.fill import fill_categories, fill_missing_categories  # noqa: E402
from shoprank.data.ingest import RECORDS  # noqa: E402
from shoprank.data.io import read_table, write_table  # noqa: E402
from shoprank.evaluation.categories import categorisation_figures  # noqa: E402
from shoprank.store.run import Run, StageRecord  # noqa: E402

log = logging.getLogger("bench")


def ingest_fill(config: Config, run: Run, hide: float, seed: int) -> dict[str, Any]:
    """Hide ``hide`` of the run's products' categories, fill them as ingest does: accuracy and seconds."""
    products = read_table(run, *RECORDS, "products")
    labelled = np.flatnonzero(pc.is_valid(products.column("category")).to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(seed)
    hidden = rng.choice(labelled, round(len(labelled) * hide), replace=False)
    mask = np.zeros(products.num_rows, bool)
    mask[hidden] = True
    truth = dict(zip(products.column("product_id").take(pa.array(hidden)).to_pylist(),
                     products.column("category").take(pa.array(hidden)).to_pylist()))
    blanked = products.set_column(products.schema.get_field_index("category"), "category",
                                  pc.if_else(pa.array(mask), pa.scalar(None, pa.string()), products.column("category")))
    started = time.perf_counter()
    filled = fill_categories(config, blanked)
    seconds = time.perf_counter() - started
    predicted = dict(zip(filled.predictions.column("product_id").to_pylist(),
                         filled.predictions.column("category").to_pylist()))
    counts = pc.value_counts(blanked.column("category").drop_null())
    return {"products": products.num_rows, "hidden": len(truth), "predicted": len(predicted),
            "accuracy": float(np.mean([predicted.get(p) == c for p, c in truth.items()])),
            "most_frequent_share": max(counts.field("counts").to_pylist()) / (products.num_rows - len(truth)),
            "seconds": seconds}


def nothing_missing(config: Config, run: Run, scratch: Path, repeats: int) -> dict[str, Any]:
    """Ingest's category step on the run's products as they are, in a scratch run: seconds per call."""
    copy = Run.for_config(config.model_copy(update={"run": config.run.model_copy(update={"root": str(scratch)})}))
    write_table(copy, read_table(run, *RECORDS, "products"), *RECORDS, "products")
    seconds = []
    for _ in range(repeats):
        record = StageRecord()
        started = time.perf_counter()
        fill_missing_categories(config, copy, record)
        seconds.append(time.perf_counter() - started)
    return {"products_without_category": record.metrics["products_without_category"],
            "median_s": statistics.median(seconds), "max_s": max(seconds), "repeats": repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="demo", help="the trained run's config (preset name or file)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--hide", type=float, default=0.1, help="share of products whose category ingest predicts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timings of the step with nothing missing")
    parser.add_argument("--json", help="also write the JSON line to this file")
    args = parser.parse_args()
    if not 0 < args.hide < 1:
        parser.error("--hide: a share between 0 and 1")
    common.setup_logging()
    config = load_config(args.config, args.set)
    run = Run.for_config(config)
    machine = common.machine()

    def benchmark(scratch: Path) -> dict[str, Any]:
        started = time.perf_counter()
        held_out = categorisation_figures(config, run)
        held_out_s = time.perf_counter() - started
        fill = ingest_fill(config, run, args.hide, args.seed)
        idle = nothing_missing(config, run, scratch, args.repeats)
        rule = "=" * 78
        print(f"\n{rule}\nshoprank categorisation on {run.uri()} ({machine['cpus']} CPUs, {machine['memory_gib']} GiB)"
              f"\n{rule}")
        print(f"held-out products (out of the category loss, embedded without their category): {held_out['held_out']}"
              f", {held_out_s:.1f} s")
        print("| categoriser | top-1 | top-3 |\n|---|---|---|")
        for name, row in held_out["rows"].items():
            print(f"| {name} | {row['top1']:.4f} | {row['top3']:.4f} |")
        for note in held_out["notes"]:
            print(f"note: {note}")
        print(f"\ningest's fill: {fill['hidden']} of {fill['products']} categories hidden (seed {args.seed}), "
              f"{fill['predicted']} predicted, {fill['accuracy']:.1%} right (most frequent category "
              f"{fill['most_frequent_share']:.1%}), {fill['seconds']:.1f} s")
        print(f"ingest's category step with nothing missing: median {idle['median_s'] * 1000:.1f} ms, max "
              f"{idle['max_s'] * 1000:.1f} ms over {idle['repeats']} calls\n")
        return common.round_floats({"benchmark": "categories", "run": run.uri(), "held_out": held_out,
                                    "held_out_s": held_out_s, "ingest_fill": fill, "nothing_missing": idle,
                                    "machine": machine})

    return common.run_benchmark(benchmark, None, "categories-", args.json)


if __name__ == "__main__":
    raise SystemExit(main())
