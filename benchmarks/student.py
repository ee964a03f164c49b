"""The distilled student against its teacher: layers, parameters, queries/s at batch 16 and 1, validation NDCG@10.

For a run distilled with ``student.enabled`` (the ``distil`` stage) and exported, the
fine-tuned encoder (the teacher) and its student each in PyTorch, ONNX fp32 and ONNX
int8 embed the run's validation queries: in batches of 16 (a Serve replica's batch)
and one per call, in interleaved rounds (each round takes the six runtimes in turn,
the best round counts), so a burst of other work on this shared machine slows one
round of each runtime rather than one runtime's only figure. NDCG@10 is of each
runtime's query vectors against the teacher's catalogue vectors as the index holds
them (what the export judges by, :func:`shoprank.encoder.export.retrieval_ndcg`).
The distil and encoder stages' seconds come from the run's manifest. No Ray.

    python benchmarks/student.py --config demo --set run.root=<root> --set student.enabled=true

The machine is shared: compare the ratios to the teacher in PyTorch of one report, and
read the contention lines at its end (``benchmarks/embed.py``'s watcher).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common import ContentionWatcher, machine, print_contention, round_floats, run_benchmark, versions

from shoprank.config import load_config
from shoprank.encoder.export import SERVING_BATCH, catalogue_vectors, queries_per_s, retrieval_ndcg
from shoprank.encoder.runtime import (
    EXPORT, RUNTIMES, STUDENT, STUDENT_RUNTIMES, Embedder, OnnxEmbedder, TorchEmbedder, load_embedder,
)
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.encoder.train import FINE_TUNED, build_eval_data
from shoprank.errors import ShopRankError
from shoprank.store.run import Run


def size(embedder: Embedder) -> dict[str, Any]:
    """Layers and parameters of a PyTorch encoder, and its weights' size (fp32, in memory)."""
    assert isinstance(embedder, TorchEmbedder)
    backbone = embedder.encoder.backbone
    count = sum(p.numel() for p in backbone.parameters())
    return {"layers": backbone.config.num_hidden_layers, "parameters": count, "mib": count * 4 / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--queries", type=int, default=1000, help="Queries timed per runtime and round at batch 16.")
    parser.add_argument("--batch1-queries", type=int, default=200,
                        help="Queries timed per runtime and round at batch 1.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the JSON figures to this file")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # ONNX Runtime's intra-op threads (OnnxEmbedder)
    import torch

    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    run = Run.for_config(config)
    if not run.exists(*STUDENT) or "student" not in run.read_json(*EXPORT, "export.json")[FINE_TUNED]["offered"]:
        raise ShopRankError(f"{run.uri()} has no exported student ({'/'.join(STUDENT)}): run its pipeline with "
                            "--set student.enabled=true first")
    return run_benchmark(lambda _scratch: benchmark(args, config, run), None, "shoprank-bench-student-", args.json)


def benchmark(args: argparse.Namespace, config: Any, run: Run) -> dict[str, Any]:
    data = build_eval_data(run, config.encoder)
    queries = list(data.queries.values())
    k = config.encoder.train.eval_k
    embedders: dict[str, Embedder] = {runtime: load_embedder(config, run, zero_shot=False, runtime=runtime)
                                      for runtime in (*RUNTIMES, *STUDENT_RUNTIMES)}
    teacher = embedders["torch"]
    assert isinstance(teacher, TorchEmbedder)
    products = catalogue_vectors(run, FINE_TUNED, data, teacher, config.encoder.max_length)
    watcher = ContentionWatcher().start()
    watcher.set_phase("batch 16")
    batch16 = queries_per_s(embedders, queries, args.queries, args.rounds)  # type: ignore[arg-type]
    watcher.set_phase("batch 1")
    single = queries[: args.batch1_queries]
    batch1 = queries_per_s(embedders, single, args.batch1_queries, args.rounds, batch=1)  # type: ignore[arg-type]
    watcher.set_phase("ndcg")
    ndcg = {runtime: retrieval_ndcg(e.embed(queries, QUERY_MAX_LENGTH), products, data, k)
            for runtime, e in embedders.items()}
    watcher.stop()
    sizes = {}
    for runtime, embedder in embedders.items():  # an export holds its model's layers and weights; its size is its file
        sizes[runtime] = dict(size(embedders["student" if runtime in STUDENT_RUNTIMES else "torch"]))
        if isinstance(embedder, OnnxEmbedder):
            sizes[runtime]["mib"] = Path(embedder.path).stat().st_size / 2**20
    stages = run.manifest()["stages"]
    seconds = {name: stages.get(name, {}).get("timings", {}).get("total_s") for name in ("encoder", "distil", "export")}
    verdict = run.read_json(*EXPORT, "export.json")[FINE_TUNED]
    print(f"\nstudent vs teacher on {run.uri()}: {len(queries)} validation queries, {args.threads} threads each, "
          f"best of {args.rounds} interleaved rounds ({args.queries} queries at batch {SERVING_BATCH}, "
          f"{len(single)} at batch 1)")
    print(f"{'runtime':<18} {'layers':>6} {'params':>11} {'MiB':>6} {'q/s b16':>9} {'x':>6} {'q/s b1':>8} {'x':>6} "
          f"{'NDCG@' + str(k):>8} {'drop':>7}")
    for runtime in embedders:
        s = sizes[runtime]
        drop = None if ndcg["torch"] is None or ndcg[runtime] is None else ndcg["torch"] - ndcg[runtime]
        print(f"{runtime:<18} {s['layers']:>6} {s['parameters']:>11,} {s['mib']:>6.1f} {batch16[runtime]:>9.1f} "
              f"{batch16[runtime] / batch16['torch']:>5.2f}x {batch1[runtime]:>8.1f} "
              f"{batch1[runtime] / batch1['torch']:>5.2f}x "
              f"{'-' if ndcg[runtime] is None else format(ndcg[runtime], '.4f'):>8} "
              f"{'-' if drop is None else format(drop, '+.4f'):>7}")
    print(f"stage seconds: {seconds}; the export's pick (serve.encoder_runtime auto): {verdict['chosen']} "
          f"(export.max_ndcg_drop {config.export.max_ndcg_drop})" + "".join(f"; {n}" for n in verdict["notes"]))
    figures = {"benchmark": "student", "machine": {**machine(), **watcher.figures()}, "versions": versions(),
               "threads": args.threads, "validation_queries": len(queries), "layers": config.student.layers,
               "sizes": sizes, "queries_per_s": batch16, "queries_per_s_batch1": batch1, f"ndcg@{k}": ndcg,
               "stage_seconds": seconds, "chosen": verdict["chosen"]}
    print_contention(figures["machine"])
    return round_floats(figures)


if __name__ == "__main__":
    sys.exit(main())
