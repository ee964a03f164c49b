"""Runs on shared storage: a run root that is a filesystem URI or a pyarrow filesystem object.

A ``SubTreeFileSystem`` over a temporary directory stands in for a bucket: it is not a
``LocalFileSystem``, so everything goes the way it goes on S3 or GCS (model files
uploaded from and downloaded to local disk, Ray Data and Ray Train handed the
filesystem), yet the test can look at the files it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from shoprank.config import Config, load_config
from shoprank.errors import ConfigError, ShopRankError
from shoprank.pipeline import run_pipeline
from shoprank.privacy import KEY_ENV
from shoprank.stages import STAGE_NAMES
from shoprank.store.events import event_db_location
from shoprank.store.registry import Registry
from shoprank.store.run import Run


def bucket(path: Path) -> pafs.SubTreeFileSystem:
    path.mkdir(parents=True, exist_ok=True)
    return pafs.SubTreeFileSystem(str(path), pafs.LocalFileSystem())


def test_model_files_reach_remote_storage_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPRANK_CACHE", str(tmp_path / "cache"))
    run = Run("runs", "r", filesystem=bucket(tmp_path / "bucket"))
    with run.local_output("model") as directory:
        (directory / "weights.bin").write_bytes(b"\x01" * 64)
        (directory / "tokenizer").mkdir()
        (directory / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    stored = tmp_path / "bucket" / "runs" / "r" / "model"
    assert (stored / "weights.bin").read_bytes() == b"\x01" * 64
    assert (stored / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"

    with pytest.raises(RuntimeError), run.local_output("broken") as directory:
        (directory / "half.bin").write_bytes(b"\x00")
        raise RuntimeError("the library failed halfway")
    assert not run.exists("broken")

    local = run.local_path("model")
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert run.local_path("model") == local, "an unchanged model is downloaded once"
    (stored / "weights.bin").write_bytes(b"\x02" * 65)
    fresh = run.local_path("model")
    assert fresh != local and (fresh / "weights.bin").read_bytes() == b"\x02" * 65
    with run.local_output("booster") as directory:  # files only, no subfolder to create the folder on the way
        (directory / "model.ubj").write_bytes(b"\x03")
    assert (run.local_path("booster") / "model.ubj").read_bytes() == b"\x03"
    with pytest.raises(ShopRankError, match="runs/r/missing: not found"):
        run.local_path("missing")


def test_registry_manifest_and_config_read_through_a_file_uri(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/runs"
    Registry(uri).set("B", f"{uri}/demo", strategy="ranker")
    assert Registry(str(tmp_path / "runs")).get("B")["run"] == f"{uri}/demo"
    run = Run(uri, "demo")
    run.write_json({"stages": {}}, "manifest.json")
    assert (tmp_path / "runs" / "demo" / "manifest.json").exists()
    assert Run.from_uri(run.uri()).manifest() == {"stages": {}}

    saved = tmp_path / "best_config.yaml"
    saved.write_text("ranker:\n  max_depth: 4\n")
    assert load_config(f"file://{saved}").ranker.max_depth == 4
    with pytest.raises(ConfigError, match="missing.yaml cannot be read"):
        load_config(f"file://{tmp_path}/missing.yaml")


def test_the_event_store_asks_for_a_local_path_or_a_server_when_runs_are_remote() -> None:
    config = load_config("tiny", ["run.root=mock:///runs"])
    with pytest.raises(ConfigError, match="serve.event_db: 'events.sqlite' would be under run.root mock:///runs"):
        event_db_location(config)
    absolute = load_config("tiny", ["run.root=mock:///runs", "serve.event_db=/var/lib/shoprank/events.sqlite"])
    assert event_db_location(absolute) == "/var/lib/shoprank/events.sqlite"
    server = "postgresql://shoprank@db.internal:5432/shoprank"
    assert event_db_location(load_config("tiny", ["run.root=mock:///runs", f"serve.event_db={server}"])) == server


@pytest.mark.slow  # every serving test already reads the session's run through a file:// URI
def test_the_whole_pipeline_runs_on_a_pyarrow_filesystem(
    tiny_run: tuple[Config, Run], tiny_encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage, Ray Data, Ray Train checkpoints and the registry on a SubTreeFileSystem; a rerun skips all.

    The users' pseudonym key is config's (``run.user_key`` under ``run.root``, or ``SHOPRANK_USER_KEY``), not the
    run object's: a run on a filesystem object takes it from the environment, as docs/architecture.md says."""
    monkeypatch.setenv(KEY_ENV, "3c" * 32)
    config, _ = tiny_run
    nowhere = tmp_path / "run-root-of-the-config"
    config = load_config("tiny", [f"run.root={nowhere}", f"encoder.model={tiny_encoder_dir}"])
    run = Run("runs", config.run.name, filesystem=bucket(tmp_path / "bucket"))

    summary = run_pipeline(config, run)

    assert [s["stage"] for s in summary.stages if s["status"] == "done"] == [*STAGE_NAMES, "register"]
    assert not nowhere.exists(), "nothing may land under the config's own run root"
    stored = tmp_path / "bucket" / "runs" / config.run.name
    manifest = json.loads((stored / "manifest.json").read_text())
    assert set(STAGE_NAMES) <= set(manifest["stages"])
    assert (stored / "encoder" / "model" / "merged" / "config.json").exists()
    assert list((stored / "encoder" / "ray").rglob("checkpoint_*")), "Ray Train checkpoints go to the filesystem"
    assert (stored / "index" / "products.faiss").stat().st_size > 0
    assert (stored / "ranker" / "model" / "model.ubj").stat().st_size > 0
    assert "fine-tuned retrieval + ranker" in (stored / "evaluation" / "offline.md").read_text()
    registry = json.loads((tmp_path / "bucket" / "runs" / "registry.json").read_text())
    assert registry["aliases"]["B"]["run"] == run.uri() == f"runs/{config.run.name}"

    again = run_pipeline(config, run)
    assert {s["stage"]: s["status"] for s in again.stages} == {**dict.fromkeys(STAGE_NAMES, "skipped"), "register": "done"}
