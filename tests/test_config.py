from pathlib import Path

import pytest

from tasks.config import ConfigError, PipelineConfig, load_config, parse_config


def test_defaults_and_shipped_config_are_valid():
    PipelineConfig()
    cfg = load_config(Path(__file__).parents[1] / "configs" / "digits.yaml")
    assert cfg.search.n_trials >= 1 and "student_int8" in cfg.compress.candidates


def test_every_problem_is_reported_at_once():
    raw = {
        "search": {"n_trials": 0, "sampler": "annealing"},
        "compress": {"candidates": {"p": [{"method": "magnitude_prune", "sparsity": 1.5}]}},
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    msg = str(err.value)
    for fragment in ("search.n_trials", "search.sampler", "sparsity", "bogus"):
        assert fragment in msg, msg
    assert "4 problem(s)" in msg


def test_unknown_method_and_bad_recipe_order():
    with pytest.raises(ConfigError, match="method"):
        parse_config({"compress": {"candidates": {"x": [{"method": "lowrank"}]}}})
    with pytest.raises(ConfigError, match="torch steps cannot follow an ONNX step"):
        parse_config({"compress": {"candidates": {"x": [{"method": "quantize_static"}, {"method": "magnitude_prune"}]}}})
    with pytest.raises(ConfigError, match="reserved"):
        parse_config({"compress": {"candidates": {"baseline": [{"method": "quantize_dynamic"}]}}})


def test_search_space_ranges_checked():
    with pytest.raises(ConfigError, match="lr: low"):
        parse_config({"search": {"space": {"lr": [0.1, 0.001]}}})


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_anchors_relative_paths(tmp_path):
    cfg = PipelineConfig().resolved(tmp_path)
    assert cfg.data.dir == tmp_path.resolve() / "data"
    assert cfg.register_.bundle_dir == tmp_path.resolve() / "deploy" / "bundle"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path.resolve()}/.modelforge/mlflow.db"
    assert cfg.section_hash("search") == PipelineConfig().section_hash("search")
