"""The ``export`` stage: both encoders (fine-tuned, pretrained) to ONNX, fp32 and int8, each checked before use.

Outputs, under the run's ``encoder/onnx/``: ``fine_tuned.onnx``, ``fine_tuned.int8.onnx``,
``zero_shot.onnx``, ``zero_shot.int8.onnx`` and ``export.json``, per encoder:

* ``cosine``: the smallest cosine between each ONNX runtime's vectors and PyTorch's,
  over the validation queries and a sample of product texts. An fp32 export below
  ``export.min_cosine`` is not offered at all (a wrong export must never be fast);
* ``ndcg@10``: validation NDCG@10 of query -> product retrieval with each runtime's
  query vectors against the catalogue's vectors as the index holds them; ``None``
  where the validation split has no judged query;
* ``queries_per_s``: each runtime's throughput on those queries, batches of 16
  (the serving batch), here, now (the best of three interleaved rounds); without
  validation queries, on ``export.timed_queries`` of the sampled product texts;
  ``queries_per_s_batch1``: the same at one query per call (an unbatched request),
  on at most :data:`SINGLE_QUERIES` of them;
* ``offered``: the runtimes that may serve; ``chosen``: the fastest offered (at batch
  16) whose NDCG@10 is within ``export.max_ndcg_drop`` of PyTorch's (int8 needs a
  figure to be chosen: without judged queries its loss cannot be shown, and a note
  says so).

A run with a student (the ``distil`` stage, :mod:`shoprank.encoder.distil`) exports
it too (``student.onnx``, ``student.int8.onnx``) and judges it as three more runtimes
of the fine-tuned encoder: ``student``, ``student-onnx``, ``student-onnx-int8``. Its
cosine is to the student's own PyTorch vectors, not the teacher's (it is another
model: how far it sits from the teacher is what its NDCG@10 shows), and its NDCG@10
is of its query vectors against the teacher's catalogue vectors, as the index holds
them; like int8 it needs that figure to be chosen.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoprank.config import Config, ExportConfig
from shoprank.encoder.examples import EvalData, top_k
from shoprank.encoder.index import embedding_matrix
from shoprank.encoder.runtime import (
    EXPORT, INPUTS, OUTPUT, STUDENT, STUDENT_RUNTIMES, VERDICTS, Embedder, OnnxEmbedder, Runtime,
    TorchEmbedder, load_embedder, onnx_file, tokenizer_source,
)
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.encoder.tokens import fast_tokenizer
from shoprank.encoder.stages import evaluated_catalogue
from shoprank.encoder.train import FINE_TUNED, ZERO_SHOT, build_eval_data
from shoprank.recsys.metrics import mean_metrics
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

SERVING_BATCH = 16
"""Queries per call when timing a runtime: a Serve replica's batch (``serve.ranker_batch_size`` and above)."""
SINGLE_QUERIES = 32
"""Queries timed one per call (three rounds): PyTorch answers about 18 a second at batch 1 on the demo's two cores,
so 32 cost about 5 s per encoder; the batch-16 count (``export.timed_queries``, 512) would cost minutes of
``make demo``."""
PRODUCT_SAMPLE = 256
"""Product texts compared with PyTorch's vectors (beside every validation query)."""


def export_onnx(embedder: TorchEmbedder, path: Path, opset: int) -> None:
    """The PyTorch encoder as an ONNX graph with dynamic batch and sequence axes (tokens in, unit vectors out)."""
    import torch

    example = embedder.tokenizer(["an example query", "a longer example product text to trace"], padding=True,
                                 return_tensors="pt")
    encoder = embedder.encoder.eval()
    axes = {"batch": 0, "seq": 1}
    with torch.no_grad():
        torch.onnx.export(
            encoder, (example["input_ids"], example["attention_mask"]), str(path), dynamo=False,
            opset_version=opset, input_names=INPUTS, output_names=[OUTPUT],
            dynamic_axes={**{name: {i: a for a, i in axes.items()} for name in INPUTS}, OUTPUT: {0: "batch"}},
        )


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 weights, one scale per output channel: the per-tensor default lost too much here (cosine
    0.94 to PyTorch on MiniLM; per channel about 0.99)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between matching rows (both unit length); 1.0 for no rows."""
    return float((a * b).sum(axis=1).min()) if len(a) else 1.0


def repeated(texts: list[str], count: int) -> list[str]:
    """``texts`` over and over, ``count`` of them (all of them when there are more)."""
    return (texts * (count // max(1, len(texts)) + 1))[: max(count, len(texts))]


def queries_per_s(embedders: dict[Runtime, Embedder], queries: list[str], minimum: int,
                  rounds: int = 3, batch: int = SERVING_BATCH) -> dict[Runtime, float]:
    """Each embedder's throughput over ``queries`` (repeated to at least ``minimum``) in calls of ``batch`` queries:
    the best of ``rounds`` rounds that take the runtimes in turn, so a burst of other work on a shared machine slows
    one round of every runtime rather than one runtime's only measurement."""
    texts = repeated(queries, minimum)
    best: dict[Runtime, float] = {}
    for embedder in embedders.values():
        embedder.embed(texts[:batch], QUERY_MAX_LENGTH, batch)  # warm-up: first-call allocations
    for _ in range(rounds):
        for runtime, embedder in embedders.items():
            started = time.perf_counter()
            embedder.embed(texts, QUERY_MAX_LENGTH, batch)
            best[runtime] = max(best.get(runtime, 0.0), len(texts) / (time.perf_counter() - started))
    return best


def catalogue_vectors(run: Run, name: str, data: EvalData, reference: TorchEmbedder, max_length: int) -> np.ndarray:
    """The catalogue as encoder ``name`` embeds it for the index, in ``data.product_ids`` order: the encoder stage's
    last evaluation when it holds exactly these products (what the embed stage takes too), else embedded here by
    PyTorch."""
    evaluated = evaluated_catalogue(run).get(name)
    if evaluated is not None:
        return embedding_matrix(evaluated, data.product_ids)
    return reference.embed(data.product_texts, max_length)


def retrieval_ndcg(queries: np.ndarray, products: np.ndarray, data: EvalData, k: int) -> float | None:
    """NDCG@k of retrieval with the validation ``queries``' vectors (``data.queries`` order) over the catalogue's
    ``products`` vectors (``data.product_ids`` order); None without judged queries."""
    if not data.qrels:
        return None
    ranked = top_k(queries, products, data.product_ids, list(data.queries), k)
    return round(mean_metrics(ranked, data.qrels, k=k)[f"ndcg@{k}"], 4)


def judge(name: str, embedders: dict[Runtime, Embedder], data: EvalData, products: np.ndarray,
          config: ExportConfig, k: int, max_length: int, timed: int) -> dict[str, Any]:
    """One encoder's verdict (see the module docstring); ``timed`` queries (the validation queries, repeated) give
    each runtime's throughput. ``embedders`` holds the encoder's three runtimes and, for a fine-tuned encoder with
    a student, the student's three."""
    queries = list(data.queries.values())
    sample = data.product_texts[:PRODUCT_SAMPLE]
    references = {reference: (embedders[reference].embed(queries, QUERY_MAX_LENGTH),
                              embedders[reference].embed(sample, max_length))
                  for reference in ("torch", "student") if reference in embedders}
    verdict: dict[str, Any] = {"cosine": {}, f"ndcg@{k}": {}, "notes": []}
    for runtime, embedder in embedders.items():
        found = embedder.embed(queries, QUERY_MAX_LENGTH)
        reference_queries, reference_products = references["student" if runtime in STUDENT_RUNTIMES else "torch"]
        verdict["cosine"][runtime] = round(min(min_cosine(found, reference_queries),
                                               min_cosine(embedder.embed(sample, max_length), reference_products)), 6)
        verdict[f"ndcg@{k}"][runtime] = retrieval_ndcg(found, products, data, k)
    # Without queries, product texts stand in, only as many as asked: timing the whole sample (256 texts, three
    # rounds of three runtimes; the Online Retail example asks for 48) was most of the stage on a shop without queries.
    stand_in = queries or sample[:timed]
    verdict["queries_per_s"] = {runtime: round(figure, 1)
                                for runtime, figure in queries_per_s(embedders, stand_in, timed).items()}
    single = stand_in[:SINGLE_QUERIES]
    verdict["queries_per_s_batch1"] = {runtime: round(figure, 1) for runtime, figure
                                       in queries_per_s(embedders, single, len(single), batch=1).items()}
    offered: list[Runtime] = []
    for exact, inexact, what in (("torch", "onnx", "ONNX"), ("student", "student-onnx", "the student's ONNX")):
        if exact not in embedders:
            continue
        offered.append(exact)
        if verdict["cosine"][inexact] < config.min_cosine:
            verdict["notes"].append(f"the fp32 {what} export's vectors differ from {exact} in PyTorch (smallest "
                                    f"cosine {verdict['cosine'][inexact]} < export.min_cosine {config.min_cosine}): "
                                    f"{what} not offered")
        else:
            offered.extend([inexact, f"{inexact}-int8"])  # type: ignore[list-item]
    ndcg = verdict[f"ndcg@{k}"]
    judged_only = [r for r in offered if r not in ("torch", "onnx")]  # what may lose retrieval quality
    if ndcg["torch"] is None:
        if judged_only:
            verdict["notes"].append(f"no judged validation query: the loss of {', '.join(judged_only)} cannot be "
                                    "measured, so auto does not pick them")
        eligible = [r for r in offered if r not in judged_only]
    else:
        eligible = [r for r in offered if ndcg["torch"] - ndcg[r] <= config.max_ndcg_drop]
        for runtime in judged_only:
            if runtime not in eligible:
                verdict["notes"].append(f"{'int8' if runtime == 'onnx-int8' else runtime} loses "
                                        f"{ndcg['torch'] - ndcg[runtime]:.4f} NDCG@{k} (> export.max_ndcg_drop "
                                        f"{config.max_ndcg_drop}): auto does not pick it")
    verdict["offered"] = offered
    verdict["chosen"] = max(eligible, key=lambda r: verdict["queries_per_s"][r])
    log.info("export %s: %s", name, verdict)
    return verdict


def export_encoders(config: Config, run: Run, record: StageRecord) -> None:
    """Export, quantise and judge both encoders (see the module docstring); written whole or not at all."""
    data = build_eval_data(run, config.encoder)
    k = config.encoder.train.eval_k
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoprank-export-") as scratch:
        for name in (FINE_TUNED, ZERO_SHOT):
            reference = load_embedder(config, run, zero_shot=name == ZERO_SHOT)
            assert isinstance(reference, TorchEmbedder)
            fp32, int8 = Path(scratch) / onnx_file(name, "onnx"), Path(scratch) / onnx_file(name, "onnx-int8")
            export_onnx(reference, fp32, config.export.opset)
            quantize_int8(fp32, int8)
            tokenizer = fast_tokenizer(tokenizer_source(config, run, zero_shot=name == ZERO_SHOT))  # Serve's
            embedders: dict[Runtime, Embedder] = {
                "torch": reference, "onnx": OnnxEmbedder(fp32, tokenizer, "onnx"),
                "onnx-int8": OnnxEmbedder(int8, tokenizer, "onnx-int8"),
            }
            if name == FINE_TUNED and run.exists(*STUDENT):
                embedders.update(student_embedders(config, run, Path(scratch), tokenizer))
            products = catalogue_vectors(run, name, data, reference, config.encoder.max_length)
            found[name] = judge(name, embedders, data, products, config.export, k, config.encoder.max_length,
                                config.export.timed_queries)
            record.notes.extend(f"{name}: {note}" for note in found[name]["notes"])
        with run.local_output(*EXPORT) as target:
            for path in Path(scratch).glob("*.onnx"):
                shutil.move(str(path), target / path.name)
    run.write_json(found, *EXPORT, VERDICTS)
    record.metrics.update({name: {key: verdict[key] for key in ("chosen", "cosine", f"ndcg@{k}", "queries_per_s",
                                                                "queries_per_s_batch1")}
                           for name, verdict in found.items()})


def student_embedders(config: Config, run: Run, scratch: Path, tokenizer: Any) -> dict[Runtime, Embedder]:
    """The run's student (:data:`STUDENT`) in its three runtimes, its ONNX files written to ``scratch``."""
    student = load_embedder(config, run, zero_shot=False, runtime="student")
    assert isinstance(student, TorchEmbedder)
    fp32, int8 = scratch / onnx_file(FINE_TUNED, "student-onnx"), scratch / onnx_file(FINE_TUNED, "student-onnx-int8")
    export_onnx(student, fp32, config.export.opset)
    quantize_int8(fp32, int8)
    return {"student": student, "student-onnx": OnnxEmbedder(fp32, tokenizer, "student-onnx"),
            "student-onnx-int8": OnnxEmbedder(int8, tokenizer, "student-onnx-int8")}
