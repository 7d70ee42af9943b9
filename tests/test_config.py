from pathlib import Path

import pytest

from tasks.config import PipelineConfig, load_config, parse_config
from tasks.core.settings import ConfigError
from tasks.pipeline_run import pipeline_run


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
        parse_config(
            {"compress": {"candidates": {"x": [{"method": "quantize_static"}, {"method": "magnitude_prune"}]}}}
        )
    with pytest.raises(ConfigError, match="reserved"):
        parse_config({"compress": {"candidates": {"baseline": [{"method": "quantize_dynamic"}]}}})


def test_accuracy_aware_quantization_needs_a_val_the_model_has_not_trained_on():
    tuned = {"method": "quantize_static", "max_accuracy_loss": 0.5}
    with pytest.raises(ConfigError, match=r"candidates a, c: accuracy-aware quantization.*train\.refit"):
        parse_config(
            {
                "train": {"refit": True},
                "compress": {
                    "candidates": {
                        "a": [tuned],
                        "b": [{"method": "quantize_static"}],
                        "c": [{"method": "structured_prune"}, tuned],
                    }
                },
            }
        )
    parse_config({"train": {"refit": False}, "compress": {"candidates": {"a": [tuned]}}})


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
    tuned = parse_config({"data": {"dataset": "text", "tokenizer": "ckpt/bert"}, "model": {"pretrained": "ckpt/bert"}})
    anchored = tuned.resolved(tmp_path)  # a checkpoint folder is the project's, whatever the cwd
    assert anchored.model.pretrained == anchored.data.tokenizer == str(tmp_path.resolve() / "ckpt" / "bert")
    packaged = parse_config({"data": {"dataset": "text", "tokenizer": "minilm"}, "model": {"pretrained": "minilm"}})
    assert packaged.resolved(tmp_path).model.pretrained == "minilm"


def test_family_selects_the_pipeline_and_its_checks():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "minilm.yaml")
    assert cfg.family == "minilm" and cfg.register_.model_name == "minilm-encoder"
    assert set(cfg.compress.candidates) == {"optimized", "int8", "student", "student_int8"}
    # A partial register section keeps the encoder's own bundle, not the classifier's.
    assert parse_config({"family": "minilm", "register": {"model_name": "x"}}).register_.bundle_dir == Path(
        "deploy/minilm-bundle"
    )
    with pytest.raises(ConfigError, match="family 'bert' is not one of"):
        parse_config({"family": "bert"})
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "family": "minilm",
                "encoder": {"num_layers": 2},
                "data": {"eval_sentences": 50, "queries": 45},
                "compress": {"candidates": {"q": [{"method": "quantize_dynamic"}, {"method": "distill_layers"}]}},
            }
        )
    assert "queries (45) must leave at least 10" in str(err.value) and "torch steps cannot follow" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"structured_prune.*does not match any of the expected tags: 'distill_layers'"
    ):
        parse_config({"family": "minilm", "compress": {"candidates": {"c": [{"method": "structured_prune"}]}}})
    with pytest.raises(ConfigError, match=r"keep=\[0, 3\] but the teacher has layers 0..1"):
        parse_config(
            {
                "family": "minilm",
                "encoder": {"num_layers": 2},
                "compress": {"candidates": {"s": [{"method": "distill_layers", "keep": [0, 3]}]}},
            }
        )


def test_new_compression_methods_report_every_bad_value_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "compress": {
                    "candidates": {
                        "binary": [{"method": "binarize", "finetune_epochs": 0}],
                        "slim": [
                            {"method": "sparsity_train", "penalty": -1, "target": "filters"},
                            {"method": "structured_prune"},
                        ],
                        "qat": [{"method": "quantize_aware", "calibration_samples": 0}, {"method": "binarize"}],
                    }
                }
            }
        )
    text = str(err.value)
    for where in (
        "binary.0.binarize.finetune_epochs",
        "slim.0.sparsity_train.penalty",
        "slim.0.sparsity_train.target",
        "qat.0.quantize_aware.calibration_samples",
        "torch steps cannot follow an ONNX step",
    ):
        assert where in text, text


def test_set_overrides_any_key_by_dotted_path_and_is_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  n_trials: 20\n")
    cfg = load_config(
        path,
        [
            "search.n_trials=3",
            "train.max_epochs=10",
            "search.space.families=[mlp]",
            "validate.warmup=0",
            "gates.max_latency_ratio=null",
        ],
    )
    assert (cfg.search.n_trials, cfg.train.max_epochs, cfg.search.space.families) == (3, 10, ["mlp"])
    assert cfg.validate_.warmup == 0 and cfg.gates.max_latency_ratio is None
    with pytest.raises(ConfigError) as err:
        load_config(path, ["search.n_trialz=3", "train.max_epochs=soon"])
    assert "search.n_trialz" in str(err.value) and "train.max_epochs" in str(err.value)
    assert "with --set search.n_trialz=3" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["search.n_trials.x=1", "nothing", "a..b=1"])
    assert "search.n_trials is not a section" in str(err.value) and "expected KEY=VALUE" in str(err.value)
    assert str(err.value).count("--set") == 3


def test_a_run_records_its_overrides(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    path = tmp_path / "c.yaml"
    path.write_text("tracking: {experiment: base}\n")
    with pipeline_run(path, tmp_path, overrides=("tracking.experiment=overridden",)) as run:
        assert run.cfg.tracking.experiment == "overridden"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/.modelforge/mlflow.db")
    [recorded] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("overridden").experiment_id])
    assert recorded.data.tags["config_overrides"] == "tracking.experiment=overridden"
