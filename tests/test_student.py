"""The distilled student (issue 40): the distil stage keeps some of the fine-tuned encoder's layers and trains them
towards the teacher on Ray Train, the export judges it as three more runtimes of the fine-tuned encoder, and Serve's
readers get it when asked (and a clear error on a run without one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from shoprank.config import Config
from shoprank.encoder.distil import STUDENT_JSON, distil, distil_loss, prune, training_queries
from shoprank.encoder.model import TextEncoder, encode, load_encoder
from shoprank.encoder.runtime import (
    STUDENT, STUDENT_RUNTIMES, TorchEmbedder, chosen_runtime, load_embedder, verdicts,
)
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.encoder.tokens import tokenize
from shoprank.encoder.train import FINE_TUNED, ZERO_SHOT, build_eval_data
from shoprank.errors import ConfigError
from shoprank.stages import STAGE_NAMES
from shoprank.store.run import Run, StageRecord


def test_the_student_is_distilled_exported_and_judged(distilled: tuple[Config, Run]) -> None:
    config, run = distilled
    done = {e["stage"]: e["status"] for e in run.stage_log() if e["status"] in ("done", "skipped")}
    before = STAGE_NAMES.index("distil")  # the stages before it are the copied run's, current; distil and export run
    assert [done[name] for name in STAGE_NAMES[:before + 2]] == ["skipped"] * before + ["done"] * 2
    summary = json.loads((run.local_path(*STUDENT) / STUDENT_JSON).read_text())
    assert summary["num_layers"] == 1 < summary["teacher_layers"] == 2
    assert summary["parameters"] < summary["teacher_parameters"]
    assert AutoConfig.from_pretrained(run.local_path(*STUDENT)).num_hidden_layers == 1
    assert len(summary["epochs"]) == config.student.epochs

    verdict = verdicts(run)[FINE_TUNED]
    for key in ("cosine", "ndcg@10", "queries_per_s", "queries_per_s_batch1"):
        assert set(STUDENT_RUNTIMES) <= set(verdict[key]), key
    assert verdict["cosine"]["student-onnx"] >= config.export.min_cosine, "its ONNX must match its own PyTorch"
    assert set(STUDENT_RUNTIMES) <= set(verdict["offered"])
    ndcg = verdict["ndcg@10"]
    eligible = [r for r in verdict["offered"] if ndcg["torch"] - ndcg[r] <= config.export.max_ndcg_drop]
    assert verdict["chosen"] == max(eligible, key=lambda r: verdict["queries_per_s"][r])
    assert not set(STUDENT_RUNTIMES) & set(verdicts(run)[ZERO_SHOT]["offered"]), "the zero-shot encoder has none"

    # Serve's readers: the runtime asked for, the student's files; the zero-shot variant keeps its own pick
    assert chosen_runtime(config, run, FINE_TUNED, "student-onnx-int8") == "student-onnx-int8"
    assert chosen_runtime(config, run, ZERO_SHOT, "student") == verdicts(run)[ZERO_SHOT]["chosen"]
    queries = list(build_eval_data(run, config.encoder).queries.values())
    for runtime in STUDENT_RUNTIMES:
        vectors = load_embedder(config, run, zero_shot=False, runtime=runtime).embed(queries, QUERY_MAX_LENGTH)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_distillation_brings_the_pruned_layers_towards_the_teacher(distilled: tuple[Config, Run]) -> None:
    """On texts it trained on, the student's distillation loss is below that of the same layers pruned and untrained:
    the training did what it is for (the loss is zero for the teacher itself)."""
    config, run = distilled
    teacher, tokenizer = load_encoder(run.local_path("encoder", "model"))

    def batch(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        tokens = tokenize(tokenizer, texts, max_length)
        return {"ids": torch.from_numpy(tokens["input_ids"]), "mask": torch.from_numpy(tokens["attention_mask"]),
                "target": torch.from_numpy(encode(teacher, tokenizer, texts, max_length))}

    products = batch(build_eval_data(run, config.encoder).product_texts[:128], config.encoder.max_length)
    queries = batch(training_queries(run)[:64], QUERY_MAX_LENGTH)
    pruned = TextEncoder(prune(load_encoder(run.local_path("encoder", "model"))[0].backbone, config.student.layers))
    student = load_embedder(config, run, zero_shot=False, runtime="student")
    assert isinstance(student, TorchEmbedder)
    with torch.no_grad():
        assert float(distil_loss(teacher, products, queries, config.student)[0]) == 0.0
        before = float(distil_loss(pruned.eval(), products, queries, config.student)[0])
        after = float(distil_loss(student.encoder, products, queries, config.student)[0])
    assert after < before, (before, after)


def test_a_run_without_a_student_refuses_it_and_wrong_layers_are_named(tiny_trained: tuple[Config, Run]) -> None:
    config, run = tiny_trained
    assert not run.exists(*STUDENT)
    assert any("student.enabled is false" in note for note in run.manifest()["stages"]["distil"]["notes"])
    with pytest.raises(ConfigError, match=r"serve.encoder_runtime: student .*no student encoder.*student.enabled"):
        chosen_runtime(config, run, FINE_TUNED, "student")
    for layers, why in (([5], r"has 2 layers"), ([0, 1], r"keeps every layer")):
        wrong = config.model_copy(update={"student": config.student.model_copy(update={"enabled": True,
                                                                                       "layers": layers})})
        with pytest.raises(ConfigError, match=rf"student.layers \[.*\]: .*{why}"):
            distil(wrong, run, StageRecord())
