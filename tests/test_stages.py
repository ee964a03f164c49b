"""The stage list: one order, derived identities, and a changed setting reruns its stage and those after it only."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copied
from shoprank.config import Config, load_config
from shoprank.data.io import read_table
from shoprank.data.preprocess import preprocess_outputs
from shoprank.errors import ConfigError, ShopRankError
from shoprank.privacy import KEY_ENV
from shoprank.stages import BY_NAME, STAGE_NAMES, STAGES, run_stages, selected, stage_hash
from shoprank.store.run import STAGING, Run


def test_the_order_is_the_list_and_every_stage_comes_after_what_it_reads() -> None:
    assert STAGE_NAMES == ("ingest", "preprocess", "pretrain", "encoder", "distil", "export", "embed", "features",
                           "ranker", "evaluate")
    for position, stage in enumerate(STAGES):
        assert all(STAGE_NAMES.index(up) < position for up in stage.upstream), stage.name
        produced = {path for earlier in STAGES[:position] for path in earlier.outputs(load_config("tiny"))}
        for path in stage.inputs:  # what it reads is written by a stage before it
            assert any(path == out or path.startswith(out + "/") or out.startswith(path + "/") for out in produced), \
                (stage.name, path)


def hashes(config: Config) -> dict[str, str]:
    return {name: stage_hash(config, name) for name in STAGE_NAMES}


@pytest.mark.parametrize("override, first", [
    ("source.synthetic.seed=99", "ingest"),
    # ingest predicts missing categories with its own neighbours and model, over the products as the encoder reads them
    ("source.categories.neighbours=5", "ingest"),
    ("source.categories.model=elsewhere", "ingest"),
    ("encoder.max_length=48", "ingest"),
    ("preprocess.test_fraction=0.2", "preprocess"),
    # the optional pre-training: switched on, it and everything after it; its settings while it is off, nothing
    ("pretrain.enabled=true", "pretrain"),
    ("pretrain.epochs=3", None),
    ("encoder.train.epochs=3", "encoder"),
    ("student.enabled=true", "distil"),
    ("student.layers=[0,2,4]", None),
    ("export.max_ndcg_drop=0.01", "export"),
    ("embed.user_half_life_days=3", "embed"),
    ("retrieval.bm25_k1=1.2", "features"),
    ("features.history_events=100", "features"),
    ("features.history_fraction=0.5", "features"),
    ("features.max_requests=100", "features"),
    ("features.ctr_prior_views=5", "features"),
    # an exclusion changes the candidates, so the feature rows; diversity only re-ranks the evaluated top 10 (and
    # chooses its strength on validation there)
    ("policy.exclude.seen=[click]", "features"),
    ("policy.exclude.purchased=false", "features"),
    ("ranker.eta=0.2", "ranker"),
    ("ranker.max_depth=5", "ranker"),
    ("policy.diversity.max_per_brand=3", "evaluate"),
    ("policy.diversity.strength=0.5", "evaluate"),
    ("policy.diversity.ndcg_tolerance=0.05", "evaluate"),
    ("serve.port=8123", None),
    ("serve.encoder_runtime=onnx-int8", None),
    ("serve.categorize_method=head", None),
    ("ray.num_cpus=1", None),
    ("run.root=/elsewhere", None),
])
def test_a_changed_setting_changes_its_stage_and_every_later_one_only(override: str, first: str | None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "5e" * 32)  # one user key wherever run.root points
    base, changed = hashes(load_config("tiny")), hashes(load_config("tiny", [override]))
    cut = STAGE_NAMES.index(first) if first else len(STAGE_NAMES)
    assert [changed[n] == base[n] for n in STAGE_NAMES] == [True] * cut + [False] * (len(STAGE_NAMES) - cut)


@pytest.mark.parametrize("override", ["pretrain.epochs=3", "encoder.model=elsewhere", "encoder.description_chars=30"])
def test_an_enabled_pretrain_stage_covers_its_settings_and_the_text_it_reads(override: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched on, pre-training reruns on its own settings and on the model and product text it reads (the
    encoder's); ``encoder.description_chars`` changes ingest too (its category fill reads the same text)."""
    monkeypatch.setenv(KEY_ENV, "5e" * 32)
    base = hashes(load_config("tiny", ["pretrain.enabled=true"]))
    changed = hashes(load_config("tiny", ["pretrain.enabled=true", override]))
    assert base["pretrain"] != changed["pretrain"] and base["encoder"] != changed["encoder"]


def test_a_switched_off_stage_is_not_read_by_the_stages_after_it() -> None:
    """An optional stage that is off writes nothing, so it is no part of what the stages after it read: their
    identities and the attempts they record are those of a run made before the stage existed, which stays current
    (no encoder retrained, no export redone, because the stage was added)."""
    off = load_config("tiny")
    assert BY_NAME["encoder"].reads(off) == ("preprocess",) and BY_NAME["export"].reads(off) == ("encoder",)
    on = load_config("tiny", ["pretrain.enabled=true", "student.enabled=true"])
    assert BY_NAME["encoder"].reads(on) == ("preprocess", "pretrain")
    assert BY_NAME["export"].reads(on) == ("encoder", "distil")


SERVING_ONLY = {"run", "ray", "serve", "ui"}
"""Sections no stage reads: where the run lives, how Ray is reached, and Serve's and the page's own settings."""


def test_every_config_section_is_declared_by_a_stage_or_read_by_none() -> None:
    """A stage's identity covers whole (sub-)sections it declares, so a new setting is part of one with no list
    to update: each section of the config, and each sub-section of ``policy``, is declared by a stage or is
    one of the sections that change no stage's output."""
    declared = {section for stage in STAGES for section in stage.sections}
    policy = {f"policy.{name}" for name in type(load_config("tiny").policy).model_fields}
    sections = set(Config.model_fields) - {"policy"} | policy
    assert sections - SERVING_ONLY == declared
    assert BY_NAME["features"].sections == ("retrieval", "features", "policy.exclude")
    assert BY_NAME["evaluate"].sections == ("policy.diversity",)


def test_a_new_user_key_reingests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotating the users' key (shoprank.privacy) changes every stage: the run's pseudonyms change."""
    config = load_config("tiny")
    monkeypatch.setenv(KEY_ENV, "5e" * 32)
    before = hashes(config)
    monkeypatch.setenv(KEY_ENV, "e5" * 32)
    assert all(before[name] != changed for name, changed in hashes(config).items())


def test_unknown_stages_are_named_and_a_prefix_or_a_subset_can_be_chosen() -> None:
    assert [s.name for s in selected(until="features")] == list(STAGE_NAMES[:STAGE_NAMES.index("features") + 1])
    assert [s.name for s in selected(only=["evaluate", "embed"])] == ["embed", "evaluate"]
    with pytest.raises(ConfigError, match="unknown stage 'rank'; the stages are ingest, preprocess"):
        selected(until="rank")
    assert BY_NAME["features"].version.startswith("features-v")


def test_a_stage_run_alone_needs_what_it_reads(tmp_path: Path) -> None:
    config = load_config("tiny", [f"run.root={tmp_path}"])
    with pytest.raises(ShopRankError, match=r"stage ranker reads ranker/features, which .* does not have"):
        run_stages(config, only=["ranker"])


# a ranker trained again (17-19 s here): `make test-all`. In `make test`, which stages a ranker setting reruns is
# test_a_changed_setting_changes_its_stage_and_every_later_one_only[ranker.eta=0.2-ranker]; that the runner skips the
# current stages and runs the rest, on this run, is the session's `ranked` fixture (run_stages after `tiny_trained`:
# four stages skipped, three run); and that it runs a changed stage again and every stage after it,
# test_data_shapes.py's test_a_changed_input_file_is_ingested_again_and_an_unchanged_one_is_not and
# test_a_stage_that_runs_again_under_the_same_identity_reruns_what_reads_it_in_the_next_invocation_too below.
@pytest.mark.slow
def test_a_changed_ranker_setting_reruns_the_ranker_and_the_evaluation_only(
    ranked: tuple[Config, Run], tmp_path: Path
) -> None:
    config, run = ranked
    changed, copy = copied(ranked, tmp_path, ranker=config.ranker.model_copy(
        update={"num_boost_round": config.ranker.num_boost_round + 5}))
    since = len(copy.stage_log())
    run_stages(changed, copy)
    statuses = {e["stage"]: e["status"] for e in copy.stage_log()[since:] if e["status"] != "started"}
    before = STAGE_NAMES.index("ranker")
    assert statuses == {**dict.fromkeys(STAGE_NAMES[:before], "skipped"), "ranker": "done", "evaluate": "done"}
    old, new = run.manifest()["stages"], copy.manifest()["stages"]
    assert [new[n]["config_hash"] == old[n]["config_hash"] for n in STAGE_NAMES] == [True] * before + [False] * 2


def test_a_stage_run_alone_refuses_what_a_changed_upstream_stage_has_not_rebuilt(
    ranked: tuple[Config, Run], tmp_path: Path
) -> None:
    """The ranker alone after a retrieval change would train on the old feature rows under the new identity."""
    retrieval = ranked[0].retrieval
    changed, copy = copied(ranked, tmp_path,
                           retrieval=retrieval.model_copy(update={"bm25_k1": retrieval.bm25_k1 + 0.3}))
    with pytest.raises(ShopRankError, match=r"stage ranker reads what features wrote, which is not current"):
        run_stages(changed, copy, only=["ranker"])


def test_a_stage_that_runs_again_under_the_same_identity_reruns_what_reads_it_in_the_next_invocation_too(
    tiny_run: tuple[Config, Run], tmp_path: Path
) -> None:
    """Outputs gone, the stage runs again and may write other ones: the stages after it do not keep theirs, in the
    same invocation, and in the next one when the first stopped between the two (a job killed there)."""
    config, copy = copied(tiny_run, tmp_path)
    copy.remove("data", "records")
    since = len(copy.stage_log())
    run_stages(config, copy, until="preprocess")
    assert statuses_since(copy, since) == {"ingest": "done", "preprocess": "done"}
    copy.remove("data", "records")
    run_stages(config, copy, only=["ingest"])
    since = len(copy.stage_log())
    run_stages(config, copy, until="preprocess")
    assert statuses_since(copy, since) == {"ingest": "skipped", "preprocess": "done"}


def statuses_since(run: Run, since: int) -> dict[str, str]:
    return {e["stage"]: e["status"] for e in run.stage_log()[since:] if e["status"] != "started"}


def table_digests(run: Run, outputs: list[str]) -> dict[str, str]:
    """Each output table's rows, in any order, as one digest: equal digests, equal tables."""
    return {rel: hashlib.sha256("\n".join(sorted(map(repr, read_table(run, *rel.split("/")).to_pylist()))).encode())
            .hexdigest() for rel in outputs}


def test_a_job_killed_mid_stage_after_an_upstream_rerun_is_finished_by_the_next_run_as_a_clean_run(
    tiny_run: tuple[Config, Run], tmp_path: Path
) -> None:
    """SIGKILL in the middle of ``preprocess``, after ``ingest`` ran again: the next run runs ``preprocess`` (never
    skips it on its old entry) and its outputs are the clean run's, with nothing half-written left behind."""
    config, copy = copied(tiny_run, tmp_path)
    copy.remove("data", "records")  # ingest runs again, under the same identity
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "preprocess.py"), "--config", "tiny",
                            "--set", f"run.root={tmp_path}"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    staging = tmp_path / copy.name / STAGING / "preprocess"
    deadline = time.monotonic() + 120
    try:
        # mid-stage: the body has written some of its outputs, not all
        while not (staging.exists() and any(staging.rglob("*.parquet"))):
            assert job.poll() is None, "the job ended before it could be killed mid-stage"
            assert time.monotonic() < deadline, "preprocess did not start writing within 120 s"
            time.sleep(0.01)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert [e["status"] for e in copy.stage_log() if e["stage"] == "preprocess"][-1] == "started"
    assert "preprocess" not in copy.manifest()["stages"]  # cleared before the body ran: nothing to trust
    assert not any(copy.exists(*rel.split("/")) for rel in preprocess_outputs())  # nothing half-written in place

    since = len(copy.stage_log())
    run_stages(config, copy, until="preprocess")
    assert statuses_since(copy, since) == {"ingest": "skipped", "preprocess": "done"}
    assert not copy.exists(STAGING)
    assert table_digests(copy, preprocess_outputs()) == table_digests(tiny_run[1], preprocess_outputs())


@pytest.mark.slow  # the path every `make demo` takes (demo: 2 actors on 2 CPUs); here, that it changes no row
def test_actor_pools_that_hold_every_cpu_embed_and_build_the_same_rows(
    ranked: tuple[Config, Run], tmp_path: Path
) -> None:
    """One actor per CPU (the demo's setting, and the feature pool's default): reads and writes around the pools would starve beside them, so they
    run before and after; the vectors and the feature rows are those of one actor."""
    import numpy as np
    import pandas as pd

    from shoprank.data.io import read_table
    from shoprank.ranker.stages import feature_actor_count
    from shoprank.ranker.train import read_features

    config, run = ranked
    cpus = config.ray.num_cpus
    # feature_actors unset: one per CPU of the cluster, as a preset without the key gets
    changed, copy = copied(ranked, tmp_path, embed=config.embed.model_copy(update={"actors": cpus}),
                           ranker=config.ranker.model_copy(update={"feature_actors": None}))
    assert feature_actor_count(changed) == cpus
    run_stages(changed, copy, only=["embed", "features"])
    done = [e["stage"] for e in copy.stage_log() if e["status"] == "done"]
    assert done[-2:] == ["embed", "features"]
    for table in (("embeddings", "products"), ("embeddings", "zero_shot_products")):
        before, after = (read_table(r, *table).sort_by("product_id") for r in (run, copy))
        assert after.column("product_id").equals(before.column("product_id"))
        np.testing.assert_allclose(np.stack(after.column("embedding").to_numpy(zero_copy_only=False)),
                                   np.stack(before.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-5)
    for split in ("train", "test"):
        before, after = (read_features(r, split).sort_values(["request_id", "product_id"], ignore_index=True)
                         for r in (run, copy))
        pd.testing.assert_frame_equal(after, before)
