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
    """A 2-layer BERT whose tokenizer is trained on the tiny catalogue and queries."""
    from shoprank.data.io import read_table
    from shoprank.encoder.model import product_texts
    from shoprank.encoder.tiny import build_tiny_encoder

    config, run = tiny_run
    texts = product_texts(read_table(run, "data", "products"), config.encoder)
    texts += read_table(run, "data", "query_pairs", columns=["query"]).column("query").to_pylist()
    return build_tiny_encoder(texts, tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_trained(tiny_run: tuple[Config, Run], tiny_encoder_dir: Path) -> tuple[Config, Run]:
    """The tiny run with its encoder fine-tuned (tiny BERT) and its catalogue embedded and indexed."""
    from shoprank.encoder.stages import train_and_embed

    config, _ = tiny_run
    config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"model": str(tiny_encoder_dir)})})
    return config, train_and_embed(config)
