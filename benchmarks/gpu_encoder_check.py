"""GPU check of the encoder's training path, runnable on a machine with a GPU and no Ray.

What `use_gpu: true` relies on inside a Ray Train worker, exercised directly: the
fine-tuning model (LoRA through peft) and every loss on CUDA under bf16 autocast,
the optimiser steps, the saved adapter and merged models giving the same
embeddings on the GPU, and CPU against GPU step throughput for a MiniLM-sized
BERT (6 layers, hidden 384). Prints a table and one JSON line; asserts only
correctness (finite, decreasing loss; matching embeddings), never a time.

    PYTHONPATH=platform python benchmarks/gpu_encoder_check.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shoprank.config import EncoderConfig, SyntheticShopConfig
from shoprank.data import synthetic
from shoprank.encoder.model import encode, load_backbone, load_encoder, save_encoder
from shoprank.encoder.objectives import Optimisation, build_model
from shoprank.encoder.tiny import build_tiny_encoder

BATCH = 64
LENGTH = 48


def _texts() -> tuple[list[str], list[str]]:
    """Product titles of a simulated shop, and queries made of each title's last words."""
    shop = SyntheticShopConfig(num_products=2000, num_users=50, num_sessions=10, num_queries=10)
    catalog = synthetic.build_catalog(shop)
    titles = synthetic.render_products(catalog, 0, len(catalog)).column("title").to_pylist()
    queries = [" ".join(t.lower().split()[-3:]) for t in titles]
    return titles, queries


def _batch(tokenizer, queries: list[str], products: list[str], start: int, device: torch.device) -> dict:
    def tok(texts: list[str], length: int) -> dict[str, torch.Tensor]:
        out = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return {k: v.to(device) for k, v in out.items()}

    q = tok(queries[start : start + BATCH], 16)
    p = tok(products[start : start + BATCH], LENGTH)
    category = torch.full((len(q["input_ids"]),), -1, dtype=torch.long, device=device)
    return {"q_ids": q["input_ids"], "q_mask": q["attention_mask"], "p_ids": p["input_ids"],
            "p_mask": p["attention_mask"], "category": category}


def _train(model_dir: Path, device: torch.device, steps: int, texts: tuple[list[str], list[str]]) -> dict:
    config = EncoderConfig(model=str(model_dir), max_length=LENGTH)
    backbone, tokenizer = load_backbone(config.model)
    model = build_model(backbone, config, num_categories=45, total_steps=steps).to(device)
    train = config.train.model_copy(update={"learning_rate": 1e-3, "warmup_fraction": 0.0})
    optimisation = Optimisation(model, train, total_steps=steps)  # what the Ray Train worker steps with
    products, queries = texts
    batches = [_batch(tokenizer, queries, products, (i * BATCH) % (len(products) - BATCH), device) for i in range(steps)]
    losses = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        loss, _ = optimisation.step(step, batch, None, use_bf16=device.type == "cuda")
        losses.append(float(loss))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"model": model, "tokenizer": tokenizer, "config": config, "losses": losses,
            "samples_per_s": steps * BATCH / seconds}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2
    gpu = torch.device("cuda")
    texts = _texts()
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_encoder(texts[0] + texts[1], Path(tmp) / "tiny")
        trained = _train(tiny, gpu, 200, texts)
        losses = trained["losses"]
        assert all(np.isfinite(losses)), losses
        assert np.mean(losses[-10:]) < np.mean(losses[:10]), "loss did not decrease on the GPU"
        report["tiny_bf16_loss_first_last"] = [round(np.mean(losses[:10]), 4), round(np.mean(losses[-10:]), 4)]

        saved = Path(tmp) / "saved"
        save_encoder(trained["model"].encoder, trained["tokenizer"], saved, trained["config"],
                     base=trained["config"].model, started_from=trained["config"].model)
        sample = texts[0][:256]
        merged, tokenizer = load_encoder(saved, "merged")
        adapter, _ = load_encoder(saved, "adapter")
        a = encode(merged.to(gpu), tokenizer, sample, LENGTH, device=gpu)
        b = encode(adapter.to(gpu), tokenizer, sample, LENGTH, device=gpu)
        report["adapter_vs_merged_max_abs_diff_gpu"] = float(np.abs(a - b).max())
        assert report["adapter_vs_merged_max_abs_diff_gpu"] < 1e-3

        mini = build_tiny_encoder(texts[0] + texts[1], Path(tmp) / "minilm-sized", hidden_size=384, layers=6)
        on_gpu = _train(mini, gpu, 20, texts)
        on_cpu = _train(mini, torch.device("cpu"), 4, texts)
        report["minilm_sized_samples_per_s"] = {"gpu_bf16": round(on_gpu["samples_per_s"], 1),
                                                "cpu_fp32": round(on_cpu["samples_per_s"], 1)}
        report["gpu_over_cpu"] = round(on_gpu["samples_per_s"] / on_cpu["samples_per_s"], 1)
    print(f"{'check':<40}{'result'}")
    for key, value in report.items():
        print(f"{key:<40}{value}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
