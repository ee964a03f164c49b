"""The ranking stages of a run: ``features``, ``ranker`` and ``evaluate``.

Outputs, under the run:

* ``ranker/features/`` Parquet rows (request, candidate, label, features) of the
  three splits, built by Ray Data with the fine-tuned encoder;
* ``ranker/ray/`` Ray Train's run; ``ranker/model/`` the booster and ``ranker.json``;
* ``evaluation/`` ``offline.json``, ``offline.md`` and ``offline.png``: popularity,
  zero-shot retrieval, fine-tuned retrieval and fine-tuned retrieval + ranker, for
  search and for recommendation, on the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, SaveMode
from ray.train.xgboost import RayTrainReportCallback

from shoprank.config import Config
from shoprank.data.io import PartFilenames
from shoprank.data.stages import run_stage
from shoprank.encoder.stages import train_and_embed
from shoprank.evaluation.metrics import catalog_coverage, mean_metrics
from shoprank.ranker.dataset import RequestFeatures, build_requests, judgments
from shoprank.ranker.features import FEATURE_SCHEMA_VERSION, FEATURES
from shoprank.ranker.train import load_ranker, predict, save_ranker, train_ranker
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

FEATURE_OUTPUTS = ["ranker/features"]
RANKER_OUTPUTS = ["ranker/ray", "ranker/model"]
EVALUATE_OUTPUTS = ["evaluation"]
K = 10
REQUESTS_PER_BATCH = 64


def feature_rows(config: Config, run: Run, requests: pd.DataFrame, *, zero_shot: bool = False) -> ray.data.Dataset:
    """Requests -> candidate rows with features and labels (Ray Data, one context per actor)."""
    blocks = max(1, len(requests) // (REQUESTS_PER_BATCH * 4))
    return ray.data.from_pandas(requests).repartition(blocks).map_batches(
        RequestFeatures,
        fn_constructor_args=(config.model_dump(mode="json"), run, zero_shot),
        compute=ActorPoolStrategy(size=1), batch_size=REQUESTS_PER_BATCH, batch_format="pandas", num_cpus=1,
    )


def build_features(config: Config, run: Run, record: StageRecord) -> None:
    requests = build_requests(config, run)
    for split, count in requests["split"].value_counts().items():
        record.rows[f"requests_{split}"] = int(count)
    feature_rows(config, run, requests).write_parquet(
        run.uri("ranker", "features"), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE,
        filesystem=run.filesystem_for_ray,
    )
    record.rows["rows"] = pads.dataset(run.path("ranker", "features"), filesystem=run.fs).count_rows()


def read_features(run: Run, split: str) -> pd.DataFrame:
    dataset = pads.dataset(run.path("ranker", "features"), filesystem=run.fs, format="parquet")
    return dataset.to_table(filter=pc.field("split") == split).to_pandas()


def with_positives(frame: pd.DataFrame) -> pd.DataFrame:
    """Only requests with a relevant candidate: the others carry no ranking signal."""
    positive = frame.groupby("request_id")["label"].transform("max") > 0
    return frame[positive]


def fit_ranker(config: Config, run: Run, record: StageRecord, warm_start: str | None = None) -> None:
    train, validation = with_positives(read_features(run, "train")), with_positives(read_features(run, "validation"))
    result = train_ranker(config, train, validation, run.uri("ranker", "ray"), warm_start,
                          storage_filesystem=run.filesystem_for_ray)
    booster = RayTrainReportCallback.get_model(result.checkpoint)
    metrics = {k: v for k, v in result.metrics.items() if "ndcg" in k}
    metrics["num_trees"] = booster.num_boosted_rounds()
    with run.local_output("ranker", "model") as directory:
        save_ranker(booster, directory, metrics)
    record.metrics.update(metrics)
    record.rows.update(train=len(train), validation=len(validation))


# --------------------------------------------------------------------------- evaluation


def top_k_of(frame: pd.DataFrame, score: str, mask: pd.Series | None = None) -> dict[str, list[str]]:
    """Each request's ``K`` products by ``score`` among the rows in ``mask`` (ties: product id)."""
    rows = frame if mask is None else frame[mask]
    rows = rows.sort_values(["request_id", score, "product_id"], ascending=[True, False, True])
    return {r: g["product_id"].head(K).tolist() for r, g in rows.groupby("request_id", sort=False)}


def qrels_of(requests: pd.DataFrame, judged: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """What was relevant to each request: the query's judgments, or the session's engagements."""
    out = {}
    for request in requests.itertuples(index=False):
        if isinstance(request.query, str):
            out[request.request_id] = {p: v for p, v in judged.get(request.query, {}).items() if v > 0}
        else:
            out[request.request_id] = {p: int(g) for p, g in zip(request.engaged_ids, request.engaged_grades)}
    return {r: rel for r, rel in out.items() if rel}


def _score(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], catalogue_size: int) -> dict[str, float]:
    runs = {r: ranked.get(r, []) for r in qrels}
    metrics = mean_metrics(runs, qrels, k=K)
    metrics["coverage"] = catalog_coverage(runs.values(), catalogue_size, k=K)
    metrics["requests"] = len(runs)
    return metrics


def evaluate_offline(config: Config, run: Run, record: StageRecord) -> None:
    """The evaluation table of the four systems on the test split (see the module docstring)."""
    requests = build_requests(config, run)
    requests = requests[requests["split"] == "test"]
    tuned = read_features(run, "test")
    zero = feature_rows(config, run, requests, zero_shot=True).to_pandas()
    booster = load_ranker(run.local_path("ranker", "model"))
    tuned["ranker"] = np.concatenate(
        [predict(booster, g[FEATURES].to_numpy(np.float32)) for _, g in tuned.groupby("request_id", sort=False)]
    ) if len(tuned) else []
    qrels = qrels_of(requests, judgments(run))
    catalogue_size = int(run.manifest()["stages"]["embed"]["rows"]["products"])
    kinds = dict(zip(requests["request_id"], requests["kind"]))
    systems = {
        "popularity": lambda kind: top_k_of(tuned, "popularity", tuned["from_lexical"] == 1) if kind == "search"
        else top_k_of(tuned, "popularity", tuned["from_popular"] == 1),
        "retrieval (zero-shot encoder)": lambda kind: top_k_of(zero, "cosine", zero["from_dense"] == 1),
        "retrieval (fine-tuned encoder)": lambda kind: top_k_of(tuned, "cosine", tuned["from_dense"] == 1),
        "fine-tuned retrieval + ranker": lambda kind: top_k_of(tuned, "ranker"),
    }
    table: dict[str, dict[str, dict[str, float]]] = {}
    missing: dict[str, str] = {}
    for kind in ("search", "recommend"):
        kind_qrels = {r: rel for r, rel in qrels.items() if kinds.get(r) == kind}
        if kind_qrels:
            table[kind] = {name: _score(system(kind), kind_qrels, catalogue_size) for name, system in systems.items()}
        else:
            missing[kind] = NO_FIGURES[kind]
            record.notes.append(f"{kind}: no figures, {NO_FIGURES[kind]}")
    with run.local_output("evaluation") as directory:
        write_evaluation(directory, table, missing)
    for kind, rows in table.items():
        record.metrics[f"{kind}/ranker_ndcg_gain_over_retrieval"] = round(
            rows["fine-tuned retrieval + ranker"]["ndcg@10"] - rows["retrieval (fine-tuned encoder)"]["ndcg@10"], 4
        )
    record.metrics["table"] = table


SYSTEMS = {
    "popularity": "the most engaged products before the cut-off (search: among BM25's candidates; "
                  "recommendation: the popular and trending candidates)",
    "retrieval (zero-shot encoder)": "the pretrained encoder's nearest products to the query or the user vector",
    "retrieval (fine-tuned encoder)": "the fine-tuned encoder's nearest products",
    "fine-tuned retrieval + ranker": "every candidate source of the fine-tuned run, ordered by the XGBoost ranker",
}
"""What each row of the evaluation compares, written under its table."""
NO_FIGURES = {
    "search": "the test split has no search request with a relevant product (no judged query, no search with an "
              "engagement)",
    "recommend": "the test split has no browsing session with an engagement (no behaviour events)",
}


def write_evaluation(directory: Path, table: dict[str, dict[str, dict[str, Any]]], missing: dict[str, str]) -> None:
    """``offline.json``, ``offline.md`` (one table, what its systems are, and why a task has no figures) and
    ``offline.png`` (NDCG@10 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "offline.json").write_text(json.dumps({**table, "no_figures": missing}, indent=2))
    columns = ["ndcg@10", "recall@10", "mrr", "coverage", "requests"]
    lines = ["| task | system | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for kind, rows in table.items():
        for name, metrics in rows.items():
            cells = [f"{metrics[c]:.4f}" if c != "requests" else str(metrics[c]) for c in columns]
            lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Systems (test split, NDCG@10 over requests with a relevant product):"]
    lines += [f"- {name}: {meaning}" for name, meaning in SYSTEMS.items()]
    lines += [f"- {kind}: no figures, {reason}" for kind, reason in missing.items()]
    (directory / "offline.md").write_text("\n".join(lines) + "\n")
    figure, axes = plt.subplots(1, max(1, len(table)), figsize=(6 * max(1, len(table)), 4), squeeze=False)
    for axis, (kind, rows) in zip(axes[0], table.items()):
        names = list(rows)
        axis.barh(names, [rows[n]["ndcg@10"] for n in names], color=["#999", "#9bd", "#48c", "#d62"][: len(names)])
        axis.set_title(f"{kind}: NDCG@10 on the test split")
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(directory / "offline.png", dpi=100)
    plt.close(figure)


RANKER_DATA_FIELDS = ("history_fraction", "max_requests", "ctr_prior_views", "history_events")
"""The ``ranker`` settings that change the feature rows; the others only change training."""
SERVE_DATA_FIELDS = ("exclude_purchased", "exclude_seen")
"""The ``serve`` settings that change the feature rows: what a recommendation's candidates leave out."""


def features_hash(config: Config) -> str:
    """The inputs of the feature rows and the feature schema (a sweep over eta or depth keeps the rows)."""
    sections = config.section_hash("source", "preprocess", "encoder", "embed", "retrieval")
    data = json.dumps({**{f: getattr(config.ranker, f) for f in RANKER_DATA_FIELDS},
                       **{f"serve.{f}": getattr(config.serve, f) for f in SERVE_DATA_FIELDS}}, sort_keys=True)
    return f"{sections}-{hashlib.sha256(data.encode()).hexdigest()[:8]}-features-v{FEATURE_SCHEMA_VERSION}"


def ranker_hash(config: Config) -> str:
    """The rows and every training setting: a new ranker (and evaluation) when either changes."""
    return f"{features_hash(config)}-{config.section_hash('ranker')}"


def train_rank_and_evaluate(config: Config, run: Run | None = None, *, evaluate: bool = True) -> Run:
    """Data and encoder stages, then features, ranker and (optionally) the evaluation; each skipped when current."""
    run = train_and_embed(config, run)
    run_stage(run, config, "features", features_hash(config), FEATURE_OUTPUTS, build_features)
    run_stage(run, config, "ranker", ranker_hash(config), RANKER_OUTPUTS, fit_ranker)
    if evaluate:
        run_stage(run, config, "evaluate", ranker_hash(config), EVALUATE_OUTPUTS, evaluate_offline)
    return run
