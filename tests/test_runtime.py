"""The encoder's runtimes: the ONNX export matches PyTorch, int8 is judged before auto may pick it, every reader
(Serve, the in-process pipeline, batch embedding) gets the runtime asked for, and a runtime that cannot serve is
refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shoprank.config import Config
from shoprank.encoder.export import SERVING_BATCH, catalogue_vectors, export_onnx, judge, quantize_int8
from shoprank.encoder.runtime import (
    EXPORT, RUNTIMES, Embedder, OnnxEmbedder, Runtime, TorchEmbedder, chosen_runtime, load_embedder, onnx_file,
    verdicts,
)
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.encoder.tiny import build_tiny_encoder
from shoprank.encoder.train import FINE_TUNED, ZERO_SHOT, build_eval_data
from shoprank.errors import ConfigError
from shoprank.recsys.context import load_context
from shoprank.recsys.booster import load_ranker
from shoprank.recsys.answer import VariantPipeline
from shoprank.store.run import Run


def test_each_runtime_embeds_like_pytorch_and_the_export_says_why_it_picked_one(
    tiny_trained: tuple[Config, Run],
) -> None:
    config, run = tiny_trained
    found = verdicts(run)
    assert set(found) == {FINE_TUNED, ZERO_SHOT}
    queries = list(build_eval_data(run, config.encoder).queries.values())
    for name, verdict in found.items():
        assert verdict["cosine"]["onnx"] >= config.export.min_cosine, verdict
        assert verdict["offered"] == list(RUNTIMES)
        assert verdict["chosen"] in RUNTIMES
        ndcg = verdict["ndcg@10"]
        eligible = [r for r in RUNTIMES if ndcg["torch"] - ndcg[r] <= config.export.max_ndcg_drop]
        assert verdict["chosen"] == max(eligible, key=lambda r: verdict["queries_per_s"][r])
        reference = load_embedder(config, run, zero_shot=name == ZERO_SHOT).embed(queries, QUERY_MAX_LENGTH)
        for runtime in RUNTIMES[1:]:
            vectors = load_embedder(config, run, zero_shot=name == ZERO_SHOT, runtime=runtime).embed(
                queries, QUERY_MAX_LENGTH, batch_size=7)  # batches padded differently from the reference's
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
            cosine = (vectors * reference).sum(axis=1).min()
            assert cosine >= (config.export.min_cosine if runtime == "onnx" else 0.9), (name, runtime, cosine)
    assert run.manifest()["stages"]["export"]["metrics"][FINE_TUNED]["chosen"] == found[FINE_TUNED]["chosen"]


def test_a_wrong_export_is_not_offered_and_int8_needs_a_validation_figure(tiny_trained: tuple[Config, Run],
                                                                         tmp_path: Path) -> None:
    """A graph that does not give PyTorch's vectors (here: another tiny BERT, initialised from another seed, standing
    in for a broken export) must never serve, however fast; without judged queries int8's loss cannot be shown."""
    config, run = tiny_trained
    data = build_eval_data(run, config.encoder)
    reference = load_embedder(config, run, zero_shot=False)
    assert isinstance(reference, TorchEmbedder)
    products = catalogue_vectors(run, FINE_TUNED, data, reference, config.encoder.max_length)
    other = build_tiny_encoder(data.product_texts + list(data.queries), tmp_path / "other", seed=1)
    other_config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"model": str(other)})})
    stranger = load_embedder(other_config, run, zero_shot=True)
    assert isinstance(stranger, TorchEmbedder)
    export_onnx(stranger, tmp_path / "wrong.onnx", config.export.opset)
    quantize_int8(tmp_path / "wrong.onnx", tmp_path / "wrong.int8.onnx")
    wrong = {"torch": reference, "onnx": OnnxEmbedder(tmp_path / "wrong.onnx", stranger.tokenizer),
             "onnx-int8": OnnxEmbedder(tmp_path / "wrong.int8.onnx", stranger.tokenizer, "onnx-int8")}
    verdict = judge(FINE_TUNED, wrong, data, products, config.export, 10, config.encoder.max_length, timed=32)
    assert verdict["offered"] == ["torch"] and verdict["chosen"] == "torch"
    assert any("ONNX not offered" in note for note in verdict["notes"])

    export = run.local_path(*EXPORT)
    right = {"torch": reference, "onnx": OnnxEmbedder(export / onnx_file(FINE_TUNED, "onnx"), reference.tokenizer),
             "onnx-int8": OnnxEmbedder(export / onnx_file(FINE_TUNED, "onnx-int8"), reference.tokenizer, "onnx-int8")}
    unjudged = dataclasses.replace(data, queries={}, qrels={})
    verdict = judge(FINE_TUNED, right, unjudged, products, config.export, 10, config.encoder.max_length, timed=32)
    assert verdict["ndcg@10"] == {runtime: None for runtime in RUNTIMES}
    assert verdict["chosen"] in ("torch", "onnx") and verdict["offered"] == list(RUNTIMES)
    assert any("cannot be measured" in note for note in verdict["notes"])


@dataclasses.dataclass
class Counted:
    """A runtime's real embedder that counts the texts it embeds in serving batches: the timing's calls."""

    inner: Embedder
    timed_texts: int = 0
    runtime: Runtime = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.runtime = self.inner.runtime

    def embed(self, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
        if batch_size == SERVING_BATCH:
            self.timed_texts += len(texts)
        return self.inner.embed(texts, max_length, batch_size)


def test_a_shop_without_queries_times_as_many_product_texts_as_asked(tiny_trained: tuple[Config, Run]) -> None:
    """Online Retail has no queries: the export timed all 256 sampled product texts where ``timed`` asked for 48,
    most of the stage; the stand-ins are cut to ``timed`` (a warm-up batch, then three rounds)."""
    config, run = tiny_trained
    data = dataclasses.replace(build_eval_data(run, config.encoder), queries={}, qrels={})
    assert len(data.product_texts) > 32, "the catalogue must have more texts than are timed, or the test shows nothing"
    reference = load_embedder(config, run, zero_shot=False)
    assert isinstance(reference, TorchEmbedder)
    products = catalogue_vectors(run, FINE_TUNED, data, reference, config.encoder.max_length)
    counted = {runtime: Counted(load_embedder(config, run, zero_shot=False, runtime=runtime)) for runtime in RUNTIMES}
    verdict = judge(FINE_TUNED, counted, data, products, config.export, 10, config.encoder.max_length, timed=32)
    assert {runtime: e.timed_texts for runtime, e in counted.items()} == {r: SERVING_BATCH + 3 * 32 for r in RUNTIMES}
    assert all(figure > 0 for figure in verdict["queries_per_s"].values())


def test_a_runtime_that_cannot_serve_is_refused_with_the_reason(tiny_trained: tuple[Config, Run],
                                                                tmp_path: Path) -> None:
    config, run = tiny_trained
    assert chosen_runtime(config, run, FINE_TUNED, "auto") == verdicts(run)[FINE_TUNED]["chosen"]
    gpu = config.model_copy(update={"ray": config.ray.model_copy(update={"use_gpu": True})})
    assert chosen_runtime(gpu, run, FINE_TUNED, "auto") == "torch", "auto serves PyTorch on a GPU"
    bare = Run(str(tmp_path), "bare")  # a run without an export (made before the stage existed, say)
    assert chosen_runtime(config, bare, FINE_TUNED, "auto") == "torch"
    with pytest.raises(ConfigError, match=r"serve.encoder_runtime: onnx-int8 .*no ONNX export"):
        chosen_runtime(config, bare, FINE_TUNED, "onnx-int8")


def test_the_in_process_pipeline_searches_with_the_int8_encoder(ranked: tuple[Config, Run]) -> None:
    config, run = ranked
    context = load_context(config, run, runtime="onnx-int8")
    assert context.embedder is not None and context.embedder.runtime == "onnx-int8"
    pipeline = VariantPipeline(context, "ranker", load_ranker(run.local_path("ranker", "model")))
    query = next(iter(build_eval_data(run, config.encoder).queries))
    items = pipeline.search(query, None, 5, float(context.catalogue.stats.cutoff_s))
    assert len(items) == 5 and all(np.isfinite(item.score) for item in items)


def test_a_process_serving_onnx_imports_no_pytorch(ranked: tuple[Config, Run]) -> None:
    """A variant replica on an ONNX runtime loads its context, encodes and ranks without PyTorch or transformers'
    models (about 7 s of CPU less per replica start here)."""
    config, run = ranked
    probe = (
        "import json, sys\n"
        "from shoprank.config import Config\n"
        "from shoprank.recsys.context import load_context\n"
        "from shoprank.recsys.booster import load_ranker\n"
        "from shoprank.recsys.answer import VariantPipeline\n"
        "from shoprank.store.run import Run\n"
        f"config = Config.model_validate_json({config.model_dump_json()!r})\n"
        f"run = Run.from_uri({run.uri()!r})\n"
        "context = load_context(config, run, runtime='onnx-int8')\n"
        "pipeline = VariantPipeline(context, 'ranker', load_ranker(run.local_path('ranker', 'model')))\n"
        "items = pipeline.search('red shoes', None, 3, float(context.catalogue.stats.cutoff_s))\n"
        "print(json.dumps({'items': len(items), 'torch': 'torch' in sys.modules,\n"
        "                  'models': 'transformers.modeling_utils' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"items": 3, "torch": False, "models": False}


def test_the_category_head_is_exported_in_numpy_and_serves_only_the_fine_tuned_variant(
    tiny_trained: tuple[Config, Run],
) -> None:
    """``head.npz`` is ``head.pt`` in numpy with its labels' categories, so a replica in ONNX Runtime fills in a live
    product's category without PyTorch; the pretrained encoder has no head, and a run exported before it none."""
    import torch

    from shoprank.encoder.text import CATEGORY_HEAD
    from shoprank.encoder.categories import CategoryHead
    from shoprank.serving.loaders import RunLoader
    from shoprank.serving.variants import VariantSpec
    from shoprank.store.tables import read_table

    config, run = tiny_trained
    saved = torch.load(run.local_path("encoder", "model", "head.pt"))
    head = CategoryHead.load(run.local_path(*CATEGORY_HEAD))
    np.testing.assert_array_equal(head.weight, saved["weight"].numpy())
    np.testing.assert_array_equal(head.bias, saved["bias"].numpy())
    categories = read_table(run, "data", "categories")
    assert head.categories == categories.sort_by("category_label").column("category").to_pylist()
    spec = VariantSpec(name="B", alias="B", run=run.uri(), ranker_run=run.uri(), strategy="retrieval",
                       encoder="fine_tuned")
    loader = RunLoader(config)
    assert isinstance(loader.categoriser(spec), CategoryHead)
    assert loader.categoriser(spec.model_copy(update={"encoder": "zero_shot"})) is None
    vectors = load_embedder(config, run, zero_shot=False).embed(["a product"], config.encoder.max_length)
    assert head(vectors)[0] in head.categories
