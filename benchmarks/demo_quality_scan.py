"""Scan the encoder's training settings on a run's data: validation NDCG@10 per setting.

Ray-free and device-agnostic: the examples (:mod:`shoprank.encoder.examples`), the
losses and the optimiser (:mod:`shoprank.encoder.objectives`) are the ones the Ray
Train worker uses, in a plain loop, in float32 (as on CPU) even on a GPU. On a GPU
a whole 2-epoch fine-tune of MiniLM on the ``demo`` data takes seconds, so this is
how the ``demo`` preset's settings were chosen: each setting's gain over the
zero-shot encoder, on the validation and the test queries, and its CPU cost
(encoder passes per epoch, relative to the base setting).

    python benchmarks/demo_quality_scan.py --data runs/demo/data --model packaged:all-MiniLM-L6-v2

``--data`` holds the run's ``products``, ``query_pairs`` and ``coengagement``
Parquet folders. Each setting is a set of ``encoder.train``/``encoder.lora``
overrides on the ``demo`` preset's encoder section; ``--greedy`` then combines
the settings that helped, best first, keeping each only when it helps again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from shoprank.config import EncoderConfig
from shoprank.encoder.examples import EvalData, eval_data, evaluate, training_tables
from shoprank.encoder.model import TextEncoder, load_backbone
from shoprank.encoder.objectives import Optimisation, build_model
from shoprank.encoder.tokens import Tokenize

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

SETTINGS: dict[str, dict[str, Any]] = {
    "base": {},
    "lr 1e-3": {"train.learning_rate": 1e-3},
    "lr 2e-3": {"train.learning_rate": 2e-3},
    "negatives irrelevant only": {"train.hard_negative_labels": [0]},
    "negatives irrelevant+complement": {"train.hard_negative_labels": [0, 1]},
    "no hard negatives": {"train.hard_negatives": 0},
    "3 hard negatives": {"train.hard_negatives": 3},
    "8 positives/query": {"train.max_positives_per_query": 8},
    "16 positives/query": {"train.max_positives_per_query": 16},
    "co-engagement 0.1": {"train.coengagement_weight": 0.1},
    "no co-engagement": {"train.coengagement_weight": 0.0},
    "temperature 0.02": {"train.temperature": 0.02},
    "temperature 0.1": {"train.temperature": 0.1},
    "no category loss": {"train.category_weight": 0.0},
    "lora r16": {"lora.r": 16, "lora.alpha": 32},
    "lora +dense": {"lora.target_modules": ["query", "key", "value", "dense"]},
    "3 epochs": {"train.epochs": 3},
    "batch 64": {"train.batch_size": 64},
    "lr 3e-3": {"train.learning_rate": 3e-3},
    "lr 2e-3 +dense": {"train.learning_rate": 2e-3, "lora.target_modules": ["query", "key", "value", "dense"]},
    "lr 2e-3 3 negatives": {"train.learning_rate": 2e-3, "train.hard_negatives": 3},
    "lr 2e-3 no co-engagement": {"train.learning_rate": 2e-3, "train.coengagement_weight": 0.0},
    "lr 2e-3 16 positives": {"train.learning_rate": 2e-3, "train.max_positives_per_query": 16},
}


def encoder_config(base: dict[str, Any], overrides: dict[str, Any]) -> EncoderConfig:
    merged = json.loads(json.dumps(base))
    for key, value in overrides.items():
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return EncoderConfig.model_validate(merged)


def tensors(tokens: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in tokens.items()}


def batches(tokens: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    rows = len(next(iter(tokens.values())))
    return [{k: v[i : i + size] for k, v in tokens.items()} for i in range(0, rows, size)]


def fine_tune(config: EncoderConfig, tables: dict[str, Any], data: dict[str, EvalData], device: torch.device) -> dict:
    """The worker loop's steps, without Ray: per epoch, validation and test metrics."""
    train = config.train
    torch.manual_seed(train.seed)
    qp, co = training_tables(tables["products"], tables["query_pairs"], tables["coengagement"], config,
                             tables["user_histories"])
    tokenize = Tokenize(config.model, config.max_length)
    qp_batches = batches(tensors(tokenize(qp.to_pydict() | {"category": np.array(qp["category"])}), device),
                         train.batch_size)
    co_batches = (batches(tensors(tokenize(co.to_pydict()), device), train.batch_size)
                  if co.num_rows and train.coengagement_weight > 0 else [])
    backbone, tokenizer = load_backbone(config.model)
    total_steps = max(1, len(qp_batches) * train.epochs // train.gradient_accumulation)
    model = build_model(backbone, config, tables["num_categories"], total_steps).to(device)
    optimisation = Optimisation(model, train, total_steps)
    epochs = []
    started = time.perf_counter()
    for epoch in range(train.epochs):
        model.train()
        for step, batch in enumerate(qp_batches):
            pairs_step = step // train.coengagement_every
            pairs = co_batches[pairs_step] if step % train.coengagement_every == 0 and pairs_step < len(co_batches) else None
            optimisation.step(step, batch, pairs, use_bf16=False)
        scores = {split: evaluate(model.encoder, model.head, tokenizer, d, config.max_length, train.eval_k, device)
                  for split, d in data.items()}
        epochs.append({f"{split}/ndcg@10": round(s["ndcg@10"], 4) for split, s in scores.items()})
    passes = 2 + train.hard_negatives + (2 / train.coengagement_every if co_batches else 0)
    return {"epochs": epochs, "rows": qp.num_rows, "encoder_passes": qp.num_rows * passes * train.epochs,
            "seconds": round(time.perf_counter() - started, 1)}


def zero_shot(config: EncoderConfig, data: dict[str, EvalData], device: torch.device) -> dict[str, float]:
    backbone, tokenizer = load_backbone(config.model)
    encoder = TextEncoder(backbone).to(device)
    return {f"{split}/ndcg@10": round(evaluate(encoder, None, tokenizer, d, config.max_length, 10, device)["ndcg@10"], 4)
            for split, d in data.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    parser.add_argument("--greedy", action="store_true", help="then combine the settings that helped")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per setting (the mean is reported)")
    parser.add_argument("--out", type=Path, help="write every result here as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on a CPU
    base = yaml.safe_load(DEMO.read_text())["encoder"] | {"model": args.model}
    tables = {name: pq.read_table(args.data / name)
              for name in ("products", "query_pairs", "coengagement", "user_histories")}
    tables["num_categories"] = pq.read_table(args.data / "categories").num_rows
    config = encoder_config(base, {})
    data = {split: eval_data(tables["products"], tables["query_pairs"], config, split) for split in ("validation", "test")}
    baseline = zero_shot(config, data, device)
    print(json.dumps({"zero_shot": baseline, "device": str(device),
                      "queries": {s: len(d.queries) for s, d in data.items()}}), flush=True)
    results: dict[str, Any] = {"zero_shot": baseline, "settings": {}}

    def run(name: str, overrides: dict[str, Any]) -> float:
        outcomes = [fine_tune(encoder_config(base, overrides | {"train.seed": seed}), tables, data, device)
                    for seed in range(args.seeds)]
        last = {key: float(np.mean([o["epochs"][-1][key] for o in outcomes])) for key in baseline}
        gain = {key: round(last[key] - baseline[key], 4) for key in baseline}
        entry = {"overrides": overrides, "gain": gain, "per_seed": outcomes}
        results["settings"][name] = entry
        print(json.dumps({"setting": name, "gain": gain, "epochs": outcomes[0]["epochs"],
                          "encoder_passes": outcomes[0]["encoder_passes"], "seconds": outcomes[0]["seconds"]}),
              flush=True)
        return gain["validation/ndcg@10"] + gain["test/ndcg@10"]

    scored = {name: run(name, SETTINGS[name]) for name in (args.only or SETTINGS)}
    if args.greedy:
        best_name, best = "base", scored.get("base", run("base", {}))
        combined: dict[str, Any] = {}
        for name in sorted(scored, key=scored.get, reverse=True):
            if name == "base" or scored[name] <= scored["base"] or any(k in combined for k in SETTINGS[name]):
                continue
            trial = combined | SETTINGS[name]
            score = run(f"greedy {best_name} + {name}", trial) if combined else scored[name]
            if score > best:
                best, best_name, combined = score, f"{best_name} + {name}", trial
        results["greedy"] = {"overrides": combined, "score": best}
        print(json.dumps({"greedy": combined, "score": round(best, 4)}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
