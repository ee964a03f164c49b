"""The optional ``pretrain`` stage: masked-language pre-training of the tiny BERT on the tiny run's text, and the
encoder fine-tuned from it (and, switched off, from ``encoder.model`` as before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from shoprank.config import Config
from shoprank.encoder.model import encode, load_encoder
from shoprank.encoder.text import PRETRAINED
from shoprank.stages import run_stages
from shoprank.store.run import Run

STEPS = 6


@pytest.fixture(scope="module")
def pretrained(tiny_run: tuple[Config, Run], tiny_encoder_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Run]:
    """A copy of the session's tiny run (its data stages, its users' key) with pre-training switched on, run
    through the encoder stage: a handful of steps of the tiny BERT."""
    config, run = tiny_run
    root = tmp_path_factory.mktemp("pretrain-runs")
    shutil.copytree(run.path(), root / run.name)
    shutil.copytree(Path(run.path()).parent / "secrets", root / "secrets")
    changed = config.model_copy(update={
        "run": config.run.model_copy(update={"root": str(root)}),
        # one epoch of fine-tuning: what it started from is the point here, not how well it trains
        "encoder": config.encoder.model_copy(update={
            "model": str(tiny_encoder_dir), "train": config.encoder.train.model_copy(update={"epochs": 1})}),
        "pretrain": config.pretrain.model_copy(update={"enabled": True, "max_steps": STEPS, "batch_size": 16,
                                                       "learning_rate": 2e-3, "heldout_texts": 64}),
    })
    copy = Run.for_config(changed)
    since = len(copy.stage_log())
    run_stages(changed, copy, until="encoder")
    statuses = {e["stage"]: e["status"] for e in copy.stage_log()[since:] if e["status"] != "started"}
    assert statuses == {"ingest": "skipped", "preprocess": "skipped", "pretrain": "done", "encoder": "done"}
    return changed, copy


def _weights(directory: Path | str) -> dict[str, torch.Tensor]:
    return AutoModel.from_pretrained(directory).state_dict()


def test_pretraining_changes_the_backbone_the_encoder_starts_from_and_the_run_records_it(
    pretrained: tuple[Config, Run], tiny_encoder_dir: Path
) -> None:
    config, run = pretrained
    record = json.loads(Path(run.path(*PRETRAINED, "pretrain.json")).read_text())
    assert record["steps"] == STEPS and record["texts"]["heldout"] == 64
    assert record["heldout_after"]["loss"] < record["heldout_before"]["loss"]
    packaged, backbone = _weights(tiny_encoder_dir), _weights(run.path(*PRETRAINED))
    assert packaged.keys() == backbone.keys()
    moved = [name for name in packaged if not torch.equal(packaged[name], backbone[name])]
    # every encoder weight moved; the pooler, which mean pooling never reads and the masked-token loss never
    # trains, is the packaged one's
    assert {name for name in packaged if not name.startswith("pooler.")} == set(moved)

    stage = run.manifest()["stages"]["encoder"]["metrics"]
    assert stage["started_from"] == run.uri(*PRETRAINED)
    saved = json.loads(Path(run.path("encoder", "model", "encoder.json")).read_text())
    assert saved["started_from"] == run.uri(*PRETRAINED)
    # LoRA trained the attention's query, key and value; every other weight of the merged model is the pre-trained
    # backbone's, not encoder.model's: the export rebuilt the model on the base training started from
    merged = _weights(run.path("encoder", "model", "merged"))
    untouched = [name for name in backbone if not any(part in name for part in (".query.", ".key.", ".value."))]
    assert any(".query." in name for name in backbone) and len(untouched) > len(backbone) // 2
    for name in untouched:
        assert torch.equal(merged[name], backbone[name]), name
    assert not torch.equal(merged["embeddings.word_embeddings.weight"], packaged["embeddings.word_embeddings.weight"])
    # the adapter loads on the base encoder.json names, and gives the merged model's vectors
    texts = ["red skillet", "oak desk lamp", "a blue rug"]
    vectors = [encode(*load_encoder(Path(run.path("encoder", "model")), form), texts, config.encoder.max_length)
               for form in ("merged", "adapter")]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)


def test_the_zero_shot_baseline_stays_encoder_model_and_pretraining_switched_off_writes_nothing(
    pretrained: tuple[Config, Run], tiny_trained: tuple[Config, Run]
) -> None:
    """``tiny_trained`` is the same data with pre-training off (the default)."""
    config, run = tiny_trained
    stages = run.manifest()["stages"]
    assert stages["pretrain"]["outputs"] == {} and "pretrain.enabled is false" in stages["pretrain"]["notes"][0]
    assert not run.exists("pretrain")
    assert stages["encoder"]["metrics"]["started_from"] == config.encoder.model
    assert json.loads(Path(run.path("encoder", "model", "encoder.json")).read_text())["base_model"] == \
        config.encoder.model
    # variant A's encoder, and the gain over it, are encoder.model's in both runs
    on = pretrained[1].manifest()["stages"]["encoder"]["metrics"]
    off = stages["encoder"]["metrics"]
    zero_shot = [key for key in off if key.startswith("zero_shot/")]
    assert zero_shot and all(on[key] == pytest.approx(off[key], abs=1e-6) for key in zero_shot)
