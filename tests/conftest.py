"""Shared fixtures: one local Ray cluster per test session, and one tiny run built once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

# Token authentication stays on, as on every shoprank cluster; Ray reads the mode once,
# when it is first imported, so it must be in the environment before `import ray`.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import pytest  # noqa: E402
import ray  # noqa: E402

from shoprank.config import Config, load_config
from shoprank.data.stages import prepare_data
from shoprank.store.run import Run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray cluster with 2 CPUs, shut down when the session ends."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_config(root: Path, *overrides: str) -> Config:
    """The tiny preset writing its run under ``root``."""
    return load_config("tiny", [f"run.root={root}", *overrides])


@pytest.fixture
def make_tiny_config() -> Callable[..., Config]:
    """``make_tiny_config(root, "a.b=c", ...)``: the tiny preset under ``root`` with overrides."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Run]:
    """The tiny preset generated and preprocessed once for every test that only reads it."""
    config = tiny_config(tmp_path_factory.mktemp("runs"))
    return config, prepare_data(config)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tiny_run: tuple[Config, Run], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer trained on the tiny catalogue: no download, seconds."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from shoprank.data.io import read_table
    from shoprank.encoder.model import product_texts

    config, run = tiny_run
    texts = product_texts(read_table(run, "data", "products"), config.encoder)
    texts += read_table(run, "data", "query_pairs", columns=["query"]).column("query").to_pylist()
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch_seed = 0
    import torch

    torch.manual_seed(torch_seed)
    model = BertModel(
        BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=128)
    )
    directory = tmp_path_factory.mktemp("tiny-encoder")
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
