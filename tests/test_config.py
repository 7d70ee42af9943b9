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


def test_family_selects_the_pipeline_and_its_checks():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "minilm.yaml")
    assert cfg.family == "minilm" and cfg.register_.model_name == "minilm-encoder"
    assert set(cfg.compress.candidates) == {"optimized", "int8", "student", "student_int8"}
    # A partial register section keeps the encoder's own bundle, not the classifier's.
    assert parse_config({"family": "minilm", "register": {"model_name": "x"}}).register_.bundle_dir == Path(
        "deploy/minilm-bundle")
    with pytest.raises(ConfigError, match="family 'bert' is not one of"):
        parse_config({"family": "bert"})
    with pytest.raises(ConfigError) as err:
        parse_config({"family": "minilm", "encoder": {"num_layers": 2},
                      "data": {"eval_sentences": 50, "queries": 45},
                      "compress": {"candidates": {"q": [{"method": "quantize_dynamic"}, {"method": "distill_layers"}]}}})
    assert "queries (45) must leave at least 10" in str(err.value) and "torch steps cannot follow" in str(err.value)
    with pytest.raises(ConfigError, match="structured_prune.*does not match any of the expected tags: 'distill_layers'"):
        parse_config({"family": "minilm", "compress": {"candidates": {"c": [{"method": "structured_prune"}]}}})
    with pytest.raises(ConfigError, match=r"keep=\[0, 3\] but the teacher has layers 0..1"):
        parse_config({"family": "minilm", "encoder": {"num_layers": 2},
                      "compress": {"candidates": {"s": [{"method": "distill_layers", "keep": [0, 3]}]}}})


def test_new_compression_methods_report_every_bad_value_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"compress": {"candidates": {
            "binary": [{"method": "binarize", "finetune_epochs": 0}],
            "slim": [{"method": "sparsity_train", "penalty": -1, "target": "filters"}, {"method": "structured_prune"}],
            "qat": [{"method": "quantize_aware", "calibration_samples": 0}, {"method": "binarize"}],
        }}})
    text = str(err.value)
    for where in ("binary.0.binarize.finetune_epochs", "slim.0.sparsity_train.penalty", "slim.0.sparsity_train.target",
                  "qat.0.quantize_aware.calibration_samples", "torch steps cannot follow an ONNX step"):
        assert where in text, text
