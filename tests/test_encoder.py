"""The encoder: fine-tuning on Ray Train with a tiny in-process BERT, checkpoints, export, embedding."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
from ray.train import TrainingFailedError
from ray.util.state import list_actors

from shoprank.config import Config, EncoderConfig
from shoprank.data.io import read_table
from shoprank.encoder.examples import training_tables
from shoprank.encoder.model import encode, load_encoder, load_encoder_from_config
from shoprank.encoder.text import product_texts
from shoprank.encoder.stages import export_checkpoint
from shoprank.encoder.train import build_training_tables, load_checkpoint_state, train_encoder
from shoprank.errors import ConfigError
from shoprank.store.run import Run


@pytest.fixture(scope="module")
def trained(tiny_trained: tuple[Config, Run]) -> tuple[Config, Run]:
    return tiny_trained


def test_training_reports_retrieval_and_category_metrics_every_epoch(trained: tuple[Config, Run]) -> None:
    config, run = trained
    metrics = run.manifest()["stages"]["encoder"]["metrics"]
    assert len(metrics["epochs"]) == config.encoder.train.epochs
    for key in ("validation/ndcg@10", "validation/recall@10", "validation/mrr",
                "validation/category_accuracy", "validation/category_macro_f1",
                "zero_shot/ndcg@10", "loss/query_product", "loss/coengagement", "loss/category"):
        assert key in metrics, key
    assert 0.0 <= metrics["validation/ndcg@10"] <= 1.0


def test_adapter_and_merged_models_give_the_same_embeddings(trained: tuple[Config, Run]) -> None:
    config, run = trained
    directory = Path(run.path("encoder", "model"))
    texts = product_texts(read_table(run, "data", "products").slice(0, 20), config.encoder)
    merged, tokenizer = load_encoder(directory, "merged")
    adapter, _ = load_encoder(directory, "adapter")
    a = encode(merged, tokenizer, texts, config.encoder.max_length)
    b = encode(adapter, tokenizer, texts, config.encoder.max_length)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_catalogue_users_and_index_are_embedded(trained: tuple[Config, Run]) -> None:
    import faiss

    config, run = trained
    products = read_table(run, "embeddings", "products")
    assert products.num_rows == config.source.synthetic.num_products
    vectors = np.stack(products.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    index = faiss.read_index(run.path("index", "products.faiss"))
    assert index.ntotal == products.num_rows
    users = read_table(run, "embeddings", "users")
    assert users.num_rows > 0


def test_the_embed_stage_takes_the_catalogue_as_the_exported_and_the_pretrained_model_embed_it(
    trained: tuple[Config, Run],
) -> None:
    """The training's last evaluation embedded the catalogue with the exported weights and with the pretrained
    model; the embed stage keeps those vectors instead of embedding twice more, so they must be what the
    served models give."""
    config, run = trained
    assert any("from the encoder's last evaluation" in note for note in run.manifest()["stages"]["embed"]["notes"])
    products = read_table(run, "data", "products")
    texts = dict(zip(products.column("product_id").to_pylist(), product_texts(products, config.encoder)))
    for table, (encoder, tokenizer) in (
        (("embeddings", "products"), load_encoder(Path(run.path("encoder", "model")))),
        (("embeddings", "zero_shot_products"), load_encoder_from_config(config.encoder)),
    ):
        stored = read_table(run, *table)
        ids = stored.column("product_id").to_pylist()
        assert sorted(ids) == sorted(texts)
        expected = encode(encoder, tokenizer, [texts[p] for p in ids], config.encoder.max_length)
        np.testing.assert_allclose(np.stack(stored.column("embedding").to_numpy(zero_copy_only=False)), expected,
                                   atol=1e-5, err_msg="/".join(table))


def _fresh_copy(run: Run, root: Path) -> Run:
    """The run's data in a new run directory, so a training there starts from nothing."""
    shutil.copytree(run.path("data"), root / run.name / "data")
    return Run(str(root), run.name)


def _with_train(config: Config, **changes: object) -> Config:
    train = config.encoder.train.model_copy(update=changes)
    return config.model_copy(update={"encoder": config.encoder.model_copy(update={"train": train})})


@pytest.mark.slow  # resuming from a checkpoint stays in the default suite: the next test
def test_a_killed_worker_resumes_from_its_checkpoint(trained: tuple[Config, Run], tmp_path: Path) -> None:
    config, run = trained
    steps_per_epoch = run.manifest()["stages"]["encoder"]["metrics"]["epochs"][0]["global_step"]
    failing = _with_train(config, fail_at_step=steps_per_epoch + 1)

    with pytest.raises(TrainingFailedError, match="injected failure"):
        train_encoder(_with_train(failing, max_failures=0), _fresh_copy(run, tmp_path / "a"))

    with_retry = train_encoder(_with_train(failing, max_failures=1), _fresh_copy(run, tmp_path / "b"))
    assert with_retry.metrics["epoch"] == config.encoder.train.epochs
    # Resumed at the epoch-1 checkpoint: no step was trained twice.
    assert with_retry.metrics["global_step"] == steps_per_epoch * config.encoder.train.epochs


def test_a_finished_run_continues_from_its_checkpoint_on_two_ddp_workers(trained: tuple[Config, Run],
                                                                       tmp_path: Path) -> None:
    """A one-worker run's last checkpoint continued for a third epoch by two workers (DDP over gloo, one CPU
    each): each trains on its own half of the rows, their weights stay the same, the result exports and loads."""
    config, run = trained
    metrics = run.manifest()["stages"]["encoder"]["metrics"]
    steps_per_epoch = metrics["epochs"][0]["global_step"]
    finished = sorted(p for p in Path(run.path("encoder", "ray")).rglob("checkpoint_*") if p.is_dir())[-1]
    sigint = signal.getsignal(signal.SIGINT)
    copy = _fresh_copy(run, tmp_path)
    more = train_encoder(_with_train(config, epochs=3, num_workers=2), copy, resume_from=str(finished))
    # Ray Train's own handler held the finished run's controller (and its split coordinators) alive, polling
    assert signal.getsignal(signal.SIGINT) is sigint
    deadline = time.monotonic() + 60
    # this session's cluster by its address: another one on the machine (a `make demo` head) makes a bare lookup fail
    session = ray.get_runtime_context().gcs_address
    while list_actors(address=session, filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]):
        assert time.monotonic() < deadline, "the finished run's controller is still alive"
        time.sleep(1)
    assert more.metrics["epoch"] == 3
    workers = more.metrics["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    rows = build_training_tables(copy, config.encoder)[0].num_rows
    assert all(w["samples"] > 0 for w in workers) and rows - 1 <= sum(w["samples"] for w in workers) <= rows
    assert workers[0]["weights_checksum"] == pytest.approx(workers[1]["weights_checksum"], rel=1e-9)
    batch = config.encoder.train.batch_size
    assert more.metrics["global_step"] == 2 * steps_per_epoch + -(-workers[0]["samples"] // batch)
    assert more.metrics["zero_shot/ndcg@10"] == metrics["zero_shot/ndcg@10"]
    # Ray keeps 2 checkpoints' metrics; the history travels in the checkpoint, so all 3 epochs are there
    assert [row["epoch"] for row in more.metrics["history"]] == [1, 2, 3]
    assert more.metrics["history"][:2] == metrics["epochs"]
    export_checkpoint(config, copy, load_checkpoint_state(more.checkpoint))
    encoder, tokenizer = load_encoder(copy.local_path("encoder", "model"))
    assert encode(encoder, tokenizer, ["red skillet"], config.encoder.max_length).shape[0] == 1


def test_use_gpu_without_a_gpu_is_a_clear_error(trained: tuple[Config, Run]) -> None:
    config, run = trained
    on_gpu = config.model_copy(update={"ray": config.ray.model_copy(update={"use_gpu": True})})
    with pytest.raises(ConfigError, match="ray.use_gpu is true but the Ray cluster has no GPU and no node type of it "
                                          "offers one"):
        train_encoder(on_gpu, run)


@pytest.mark.slow
def test_packaged_minilm_finds_the_sensible_product() -> None:
    encoder, tokenizer = load_encoder_from_config(EncoderConfig())
    products = [
        "ferrovia cast iron frying pan, 28 cm, black | home & kitchen > cookware > frying pans",
        "sonique wireless headphones, navy | electronics > audio > headphones",
        "zenmat yoga mat, tpe, green | sports & outdoors > fitness > yoga mats",
        "brewhaus coffee maker, stainless steel | home & kitchen > kitchen appliances > coffee makers",
    ]
    queries = {"skillet": 0, "bluetooth headset": 1, "exercise mat": 2, "espresso machine": 3}
    p = encode(encoder, tokenizer, products, 64)
    q = encode(encoder, tokenizer, list(queries), 32)
    assert p.shape[1] == 384
    assert (q @ p.T).argmax(axis=1).tolist() == list(queries.values())


@pytest.mark.parametrize("grades", [[0], [2], [0, 1]])
def test_hard_negatives_come_from_the_configured_grades(tiny_run: tuple[Config, Run], grades: list[int]) -> None:
    config, run = tiny_run
    train = config.encoder.train.model_copy(update={"hard_negative_labels": grades, "hard_negatives": 2})
    encoder = config.encoder.model_copy(update={"train": train})
    products, pairs = read_table(run, "data", "products"), read_table(run, "data", "query_pairs")
    qp, _ = training_tables(products, pairs, read_table(run, "data", "coengagement"), encoder)
    text_of = dict(zip(products.column("product_id").to_pylist(), product_texts(products, encoder)))
    pool: dict[str, set[str]] = {}
    for r in pairs.filter(pc.equal(pairs.column("split"), "train")).to_pylist():
        if r["source"] == "judgment" and r["label"] in grades:
            pool.setdefault(r["query"], set()).add(text_of[r["product_id"]])
    checked = 0
    for row in qp.to_pylist():
        assert len(row["negatives"]) == 2
        if row["query"] in pool:  # a query without judged products of these grades draws from the catalogue
            assert set(row["negatives"]) <= pool[row["query"]]
            checked += 1
    assert checked > 0


def test_trimming_shared_padding_keeps_the_embeddings(tiny_encoder_dir: Path) -> None:
    import torch

    from shoprank.encoder.model import TextEncoder, load_backbone
    from shoprank.encoder.tokens import tokenize
    from shoprank.encoder.objectives import trimmed

    backbone, tokenizer = load_backbone(str(tiny_encoder_dir))
    encoder = TextEncoder(backbone).eval()
    tokens = tokenize(tokenizer, ["red skillet", "a much longer product title with several words"], 48)
    ids, mask = torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"])
    short_ids, short_mask = trimmed(ids, mask)
    assert short_ids.shape[1] == int(mask.sum(1).max()) < 48
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), encoder(short_ids, short_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("finetune", ["adalora", "full"])
def test_adalora_moves_its_rank_budget_and_full_fine_tuning_trains_every_weight(
    tiny_encoder_dir: Path, finetune: str
) -> None:
    """Ray-free, a few steps on product pairs of the tiny BERT: AdaLoRA prunes its ranks from ``lora.r`` to
    ``lora.r // 2`` on its schedule (every step's ``update_and_allocate``); ``full`` trains the backbone itself."""
    import torch

    from shoprank.config import load_config
    from shoprank.encoder.model import load_backbone
    from shoprank.encoder.tokens import tokenize
    from shoprank.encoder.objectives import Optimisation, build_model

    torch.manual_seed(0)
    config = load_config("tiny", [f"encoder.model={tiny_encoder_dir}", f"encoder.finetune={finetune}"]).encoder
    backbone, tokenizer = load_backbone(str(tiny_encoder_dir))
    steps = 30
    model = build_model(backbone, config, num_categories=3, total_steps=steps)
    optimisation = Optimisation(model, config.train, steps)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    words = ["red", "skillet", "lamp", "desk", "steel", "blue", "kettle", "chair", "oak", "mug", "pan", "rug"]
    rng = np.random.default_rng(0)

    def texts() -> list[str]:
        return [" ".join(rng.choice(words, 3)) for _ in range(8)]

    for step in range(steps):
        a, b = tokenize(tokenizer, texts(), 16), tokenize(tokenizer, texts(), 16)
        pairs = {"a_ids": torch.from_numpy(a["input_ids"]), "a_mask": torch.from_numpy(a["attention_mask"]),
                 "b_ids": torch.from_numpy(b["input_ids"]), "b_mask": torch.from_numpy(b["attention_mask"])}
        optimisation.step(step, None, pairs, use_bf16=False)

    if finetune == "adalora":
        singular = [p for name, p in model.named_parameters() if "lora_E" in name]
        assert optimisation.adalora is not None and len(singular) > 0
        kept = sum(int((p != 0).sum()) for p in singular)
        assert kept == config.lora.r // 2 * len(singular) < config.lora.r * len(singular)
        assert optimisation.adalora.peft_config["default"].rank_pattern
    else:
        assert optimisation.adalora is None
        backbone_weights = [name for name in before if "encoder.backbone" in name]
        assert backbone_weights and all(model.get_parameter(name).requires_grad for name in backbone_weights)
        moved = [name for name in backbone_weights if not torch.equal(before[name], model.get_parameter(name))]
        assert len(moved) > 0.9 * len(backbone_weights)
