"""Config loading: presets, overrides, and one clear line per mistake."""

from __future__ import annotations

import json

import pytest

from rtdecoder.config import (
    PRESETS,
    RTDecoderConfig,
    load_config,
    read_saved_config,
    save_config,
)
from rtdecoder.errors import ConfigError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name: str) -> None:
    config = load_config(name)
    assert isinstance(config, RTDecoderConfig)
    assert config.name == name


def test_nsd_preset_has_paper_sizes() -> None:
    config = load_config("nsd")
    assert config.model.hidden_dim == 4096
    assert (config.model.n_tokens, config.model.token_dim) == (256, 1664)
    assert config.scanner.tr_s == pytest.approx(1.6)
    assert config.phantom.grid_shape == (81, 104, 83)


def test_file_inherits_preset_and_overrides(tmp_path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("preset: phantom\nglm:\n  method: lsa\n  beta_wait_s: 10\n")
    config = load_config(path)
    assert config.glm.method == "lsa"
    assert config.glm.beta_wait_s == 10.0
    assert config.phantom.n_voxels == load_config("phantom").phantom.n_voxels


def test_overrides_argument_wins(tmp_path) -> None:
    config = load_config("phantom", overrides={"scanner": {"tr_s": 2.0}})
    assert config.scanner.tr_s == 2.0


def test_config_is_frozen() -> None:
    config = load_config("phantom")
    with pytest.raises(Exception, match="frozen"):
        config.glm.method = "lsa"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("glm:\n  method: lsq\n", r"bad\.yaml: glm\.method: expected 'lss' or 'lsa' \(got 'lsq'\)"),
        ("glm:\n  metod: lss\n", r"glm\.metod: unknown key; expected one of: .*method"),
        ("scanner:\n  tr_s: -1\n", r"scanner\.tr_s: expected greater than 0 \(got -1\)"),
        ("phantom:\n  n_subjects: many\n", r"phantom\.n_subjects: expected a valid integer"),
        ("nonsense: 1\n", r"nonsense: unknown key; expected one of: .*glm"),
        ("model:\n  prior_dim: 10\n  prior_heads: 4\n", r"prior_dim \(10\) must be a multiple"),
        ("model:\n  n_tokens: 3\n", r"model\.n_tokens \(3\) must equal embedding\.n_tokens"),
        ("- a\n- b\n", r"expected a mapping of sections"),
        ("glm: [\n", r"line \d+: invalid YAML"),
        ("preset: nope\n", r"preset: expected one of phantom, nsd"),
    ],
)
def test_bad_config_is_one_specific_message(tmp_path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file_names_it(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot read config file"):
        load_config(tmp_path / "nowhere.yaml")


def test_save_and_read_round_trip(tmp_path) -> None:
    config = load_config("phantom", overrides={"glm": {"method": "lsa"}})
    path = tmp_path / "config.json"
    save_config(config, path)
    saved = json.loads(path.read_text())
    assert saved["_class_name"] == "RTDecoderConfig"
    assert read_saved_config(path) == config


def test_saved_config_with_retired_key_still_reads(tmp_path) -> None:
    # bundles saved before generator.retrieval_top_k was removed must keep loading
    config = load_config("phantom")
    path = tmp_path / "config.json"
    save_config(config, path)
    raw = json.loads(path.read_text())
    raw["generator"]["retrieval_top_k"] = 5
    path.write_text(json.dumps(raw))
    assert read_saved_config(path) == config


def test_retired_key_in_yaml_is_reported(tmp_path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("preset: phantom\ngenerator:\n  retrieval_top_k: 3\n")
    with pytest.raises(ConfigError, match=r"generator\.retrieval_top_k: unknown key"):
        load_config(path)


def test_saved_config_version_is_checked(tmp_path) -> None:
    path = tmp_path / "config.json"
    save_config(load_config("phantom"), path)
    raw = json.loads(path.read_text())
    raw["_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"_version: expected 1 \(got 99\)"):
        read_saved_config(path)
