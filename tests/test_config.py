"""Config: presets validate, overrides are typed, every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoprank.config import Config, load_config
from shoprank.errors import ConfigError


@pytest.mark.parametrize("preset", ["tiny", "demo", "cluster"])
def test_presets_load(preset: str) -> None:
    config = load_config(preset)
    assert isinstance(config, Config)
    assert config.run.name == preset


def test_override_is_typed() -> None:
    config = load_config("tiny", ["source.synthetic.seed=11", "ray.use_gpu=true", "preprocess.test_fraction=0.2"])
    assert config.source.synthetic.seed == 11
    assert config.ray.use_gpu is True
    assert config.preprocess.test_fraction == 0.2


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["source.synthetic.sead=3"])
    message = str(err.value)
    assert "source.synthetic.sead: unknown key" in message
    assert "seed" in message and "num_products" in message


def test_a_moved_key_names_where_it_lives_now(tmp_path: Path) -> None:
    """An older config file (``serve.exclude_purchased``, ``ranker.history_events``...) is refused with the new key,
    and nothing of it is applied silently elsewhere."""
    old = tmp_path / "old.yaml"
    old.write_text("serve:\n  exclude_purchased: false\n  max_per_brand: 3\nranker:\n  history_events: 50\n")
    with pytest.raises(ConfigError) as err:
        load_config(old)
    message = str(err.value)
    assert "serve.exclude_purchased: moved; set policy.exclude.purchased instead" in message
    assert "serve.max_per_brand: moved; set policy.diversity.max_per_brand instead" in message
    assert "ranker.history_events: moved; set features.history_events instead" in message
    config = load_config("tiny", ["policy.exclude.purchased=false", "policy.diversity.max_per_brand=3",
                                  "features.history_events=50"])
    assert (config.policy.exclude.purchased, config.policy.diversity.max_per_brand,
            config.features.history_events) == (False, 3, 50)


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"source\.synthetic\.num_products: .*integer.*'many'"):
        load_config("tiny", ["source.synthetic.num_products=many"])


def test_impossible_value_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["source.kind=csv"])
    assert "source.kind" in str(err.value)
    assert "'synthetic', 'esci' or 'files'" in str(err.value)
    with pytest.raises(ConfigError, match=r"preprocess.validation_fraction: .*less than 0.5"):
        load_config("tiny", ["preprocess.validation_fraction=0.7"])


def test_files_source_requires_files_section() -> None:
    with pytest.raises(ConfigError, match="source.files is not set"):
        load_config("tiny", ["source.kind=files"])


def test_bad_yaml_and_unknown_preset(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: cluster, demo, tiny"):
        load_config("nope")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("tiny", ["source.synthetic.seed"])


def test_hash_ignores_where_the_run_lives() -> None:
    a = load_config("tiny", ["run.root=/a"])
    b = load_config("tiny", ["run.root=/b", "ray.num_cpus=1"])
    c = load_config("tiny", ["source.synthetic.seed=99"])
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != c.config_hash()
    assert a.section_hash("source") == load_config("tiny", ["preprocess.test_fraction=0.2"]).section_hash("source")


@pytest.mark.parametrize("overrides,message", [
    (["serve.variants={A: A, B: B, C: C}"], "serve.split and serve.variants disagree: serve.split has no weight for C"),
    (["serve.split={A: 1, B: 1, D: 1}"], "serve.split weighs D, which serve.variants does not name"),
    (["serve.split={A: 1, B: -1}"], "serve.split: weights are 0 or more"),
    (["serve.control=Z"], "serve.control 'Z' is not a variant of serve.variants (A, B)"),
    (["serve.variants={}", "serve.split={}"], "serve.variants is empty"),
])
def test_variants_split_and_control_must_agree_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)


def test_an_a_b_n_experiment_names_its_control_or_takes_the_first_variant() -> None:
    three = ["serve.variants={A: A, B: B, C: C}", "serve.split={A: 1, B: 1, C: 2}"]
    serve = load_config("tiny", three).serve
    assert (serve.control_variant, serve.treatments) == ("A", ["B", "C"])
    serve = load_config("tiny", [*three, "serve.control=C"]).serve
    assert (serve.control_variant, serve.treatments) == ("C", ["A", "B"])
    assert load_config("tiny", ["serve.variants={B: B}", "serve.split={B: 1.0}"]).serve.treatments == []
