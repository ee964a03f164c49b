"""The query encoder's runtimes side by side: PyTorch, ONNX fp32 and ONNX int8, in one process.

For each encoder of a run (fine-tuned, pretrained), each runtime embeds the run's
validation queries in batches of 16 (a Serve replica's batch) and at batch 1, and
the benchmark prints queries per second, the ratio to PyTorch, the smallest cosine to
PyTorch's vectors, and the validation NDCG@10 of retrieval over the catalogue with
that runtime's query vectors (:func:`shoprank.encoder.export.judge`, what the export
stage decides ``serve.encoder_runtime: auto`` by). Every runtime gets the same
number of threads (``--threads``). No Ray.

    python benchmarks/encoder_runtime.py --config demo          # needs a run through its export stage
    python benchmarks/encoder_runtime.py --config demo --queries 2000 --threads 1

PyTorch is the baseline a user would otherwise serve with: the same model, batched,
``torch.inference_mode`` (``shoprank.encoder.model.encode``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


from common import machine, round_floats, versions

from shoprank.config import load_config
from shoprank.encoder.export import catalogue_vectors, judge, repeated
from shoprank.encoder.runtime import EXPORT, RUNTIMES, Embedder, TorchEmbedder, load_embedder
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.encoder.train import FINE_TUNED, ZERO_SHOT, build_eval_data
from shoprank.errors import ShopRankError
from shoprank.store.run import Run


def batch1_queries_per_s(embedder: Embedder, queries: list[str], count: int) -> float:
    """One query per call, as an unbatched server would run."""
    texts = repeated(queries, count)[:count]
    started = time.perf_counter()
    for text in texts:
        embedder.embed([text], QUERY_MAX_LENGTH, 1)
    return len(texts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--queries", type=int, default=1000, help="Queries timed per runtime at batch 16.")
    parser.add_argument("--batch1-queries", type=int, default=200, help="Queries timed per runtime at batch 1.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # ONNX Runtime's intra-op threads (OnnxEmbedder)
    import torch

    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    run = Run.for_config(config)
    if not run.exists(*EXPORT):
        raise ShopRankError(f"{run.uri()} has no ONNX export ({'/'.join(EXPORT)}): run its pipeline first")
    data = build_eval_data(run, config.encoder)
    queries = list(data.queries.values()) or data.product_texts[:256]
    k = config.encoder.train.eval_k
    figures: dict[str, object] = {"benchmark": "encoder_runtime", "machine": machine(), "versions": versions(),
                                  "threads": args.threads, "validation_queries": len(data.queries)}
    print(f"encoder runtimes on {run.uri()}: {len(data.queries)} validation queries, {args.threads} threads each")
    for name in (FINE_TUNED, ZERO_SHOT):
        embedders: dict[str, Embedder] = {runtime: load_embedder(config, run, zero_shot=name == ZERO_SHOT,
                                                                 runtime=runtime) for runtime in RUNTIMES}
        reference = embedders["torch"]
        assert isinstance(reference, TorchEmbedder)
        products = catalogue_vectors(run, name, data, reference, config.encoder.max_length)
        verdict = judge(name, embedders, data, products, config.export, k, config.encoder.max_length,
                        timed=args.queries)
        batch1 = {runtime: batch1_queries_per_s(e, queries, args.batch1_queries) for runtime, e in embedders.items()}
        print(f"\n{name}: {'runtime':<10} {'q/s b16':>9} {'x torch':>8} {'q/s b1':>8} {'min cos':>8} "
              f"{'NDCG@' + str(k):>8}")
        for runtime in embedders:
            ndcg = verdict[f"ndcg@{k}"][runtime]
            print(f"{'':{len(name) + 2}}{runtime:<10} {verdict['queries_per_s'][runtime]:>9.1f} "
                  f"{verdict['queries_per_s'][runtime] / verdict['queries_per_s']['torch']:>7.2f}x "
                  f"{batch1[runtime]:>8.1f} {verdict['cosine'][runtime]:>8.4f} "
                  f"{'-' if ndcg is None else format(ndcg, '.4f'):>8}")
        print(f"{'':{len(name) + 2}}auto picks {verdict['chosen']}" + "".join(f"; {n}" for n in verdict["notes"]))
        figures[name] = {**verdict, "batch1_queries_per_s": batch1,
                         "int8_over_torch": verdict["queries_per_s"]["onnx-int8"] / verdict["queries_per_s"]["torch"]}
    print(json.dumps(round_floats(figures), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
