"""LoRA fine-tuning of the causal LM (tasks/lm/lora.py, tasks/lm/train.py) on a tiny random Llama and ~30 KB
of text: it learns and merges, chats train on assistant tokens only, 2 DDP/FSDP2 ranks follow one process's
loss curve (FSDP holding half of everything per rank), a stop ends the ranks in seconds, the search resumes,
bad input is one error, and the flow fine-tunes -> compresses -> gates -> ships with the base model beside."""

import json
import shutil
import time
from pydoc_data.topics import topics

import mlflow
import numpy as np
import onnx
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flows.lm import optimize_lm
from tasks.config import parse_config
from tasks.core.settings import ConfigError
from tasks.core.stop import RunInterrupted, clear_stop, request_stop
from tasks.data.base import DataError
from tasks.data.corpus import CorpusConfig, describe_corpus, load_corpus, load_tokenizer, render
from tasks.lm.finetune import FinetuneConfig, FinetuneSearchConfig
from tasks.lm.lora import encode, merge, train_lora
from tasks.lm.train import check_finetune, search_finetune
from tests.test_lm import TINY
from tests.tiny_llm import make_tiny_llama, snap_to_q4_1

# At the default init (std 0.02) the tiny model's logits are nearly flat and LoRA gains ~5% at most; at std 0.1
# it gains ~25% in one epoch (661 -> 494) and overshoots in the second, which early stopping undoes.
INIT_STD = 0.1
FT = FinetuneConfig(
    enabled=True,
    window=32,
    lr=3e-2,
    target="attention+mlp",
    epochs=2,
    batch_size=4,
    max_windows=24,
    val_windows=4,
    patience=2,
    warmup=0.2,
)


def write_corpus(folder, n=24, chars=1200):
    folder.mkdir(parents=True, exist_ok=True)
    for key in sorted(topics)[:n]:
        (folder / f"{key}.txt").write_text(topics[key][:chars])
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-finetune")
    make_tiny_llama(root / "model", init_std=INIT_STD)
    describe_corpus(CorpusConfig(window=32, model=root / "model"), write_corpus(root / "corpus"))
    return root


@pytest.fixture(scope="module")
def data(lm):
    return check_finetune(lm / "model", lm / "corpus", FT)


def test_lora_learns_the_text_and_merges_into_a_plain_folder(lm, data, tmp_path):
    model, result = train_lora(lm / "model", data.train, data.val, FT)
    assert result.best_epoch >= 1 and result.best_perplexity < 0.8 * result.base_perplexity
    assert [h["epoch"] for h in result.history if "val_perplexity" in h] == [0, 1, 2]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.15 * sum(p.numel() for p in model.parameters())  # rank 8 of 64-wide layers
    ids = torch.from_numpy(data.val.ids[:2])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    folder = merge(model, lm / "model", tmp_path / "merged")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # noqa: SIM118  # safe_open is not iterable
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_a_separate_adapter_beside_int4_base_weights_is_the_fine_tuned_model(lm, data, tmp_path):
    """On a base whose weights lie on a Q4_1 grid, minmax INT4 of the base plus the LoRA update at FP32 computes
    the fine-tuned model (to the offsets' two int4 stages); INT4 of the merged weights does not (the update is
    off the grid)."""
    from tasks.lm.adapter import LORA_TAG, lora_pass
    from tasks.lm.evaluate import make_lm_session, window_logits
    from tasks.lm.export import build_genai
    from tasks.lm.quantize import LMRecipe, quantize_lm

    base = snap_to_q4_1(shutil.copytree(lm / "model", tmp_path / "grid"))
    model, _ = train_lora(base, data.train, data.val, FT.model_copy(update={"epochs": 1}))
    model.save_pretrained(str(tmp_path / "adapter"))
    ids = data.val.ids[0]
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
    build_genai(base, tmp_path / "base_fp32")
    build_genai(merge(model, base, tmp_path / "merged"), tmp_path / "merged_fp32")
    recipe = LMRecipe(bits=4, algorithm="minmax", block_size=32, lm_head="fp32")
    separate = quantize_lm(tmp_path / "base_fp32", recipe, tmp_path / "separate", [], tmp_path / "adapter")
    merged = quantize_lm(tmp_path / "merged_fp32", recipe, tmp_path / "merged_int4", [])
    got = {k: window_logits(make_lm_session(d, 2), ids) for k, d in (("separate", separate), ("merged", merged))}
    assert np.abs(got["separate"] - tuned).max() < 2e-3
    assert np.abs(got["merged"] - tuned).max() > 10 * np.abs(got["separate"] - tuned).max()
    # Each adapted MatMul got one rank-r detour (q, k and v share the builder's packed projection), kept at FP32.
    base_fp32 = tmp_path / "base_fp32"
    fp32 = lora_pass(onnx.load(str(base_fp32 / "model.onnx")), base_fp32, tmp_path / "adapter")
    nodes = [n for n in onnx.load(str(separate / "model.onnx"), load_external_data=False).graph.node]
    detours = [n for n in nodes if LORA_TAG in n.name]
    assert len(detours) == 3 * 5 * 2 == len([n for n in fp32.graph.node if LORA_TAG in n.name])
    assert {n.op_type for n in detours} == {"MatMul", "Add"}
    # An adapter folder saved after merge_and_unload holds no LoRA weights: an error, not the base model.
    from safetensors.numpy import save_file

    (empty := tmp_path / "emptied").mkdir()
    (empty / "adapter_config.json").write_bytes((tmp_path / "adapter" / "adapter_config.json").read_bytes())
    save_file({}, str(empty / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no LoRA weights"):
        quantize_lm(base_fp32, recipe, tmp_path / "from-emptied", [], empty)


def test_chats_train_on_assistant_tokens_only(lm, tmp_path):
    tokenizer = load_tokenizer(lm / "model")
    chat = [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
    ids, learn = encode(tokenizer, chat)
    assert tokenizer.decode(ids) == render(tokenizer, chat)
    assert (
        tokenizer.decode([i for i, keep in zip(ids, learn, strict=True) if keep])
        == "A mutable sequence.<|im_end|>\nAn immutable one.<|im_end|>\n"
    )
    corpus = tmp_path / "chats"
    corpus.mkdir()
    (corpus / "chats.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    describe_corpus(CorpusConfig(window=8, validation_fraction=0.01, test_fraction=0.01), corpus)
    assert chat in [d for docs in load_corpus(corpus).values() for d in docs]
    (corpus / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match="assistant turn"):
        describe_corpus(CorpusConfig(window=8), corpus)


def test_two_ranks_follow_one_process_and_fsdp_holds_half_per_rank(lm, data):
    cfg = FT.model_copy(update={"epochs": 1})
    runs = {}
    for processes, parallel in ((1, "ddp"), (2, "fsdp"), (2, "ddp")):
        records = []
        _, result = train_lora(
            lm / "model",
            data.train,
            data.val,
            cfg.model_copy(update={"processes": processes, "parallel": parallel}),
            records.append,
        )
        runs[processes, parallel] = [r["train_loss"] for r in records if "train_loss" in r], result
    one, one_result = runs[1, "ddp"]
    for key in ((2, "fsdp"), (2, "ddp")):
        curve, result = runs[key]
        assert len(curve) == len(one) == 6
        np.testing.assert_allclose(curve, one, rtol=1e-4)
        assert result.best_perplexity == pytest.approx(one_result.best_perplexity, rel=1e-4)
        assert [s["rank"] for s in result.shards] == [0, 1]
    for shard in runs[2, "fsdp"][1].shards:  # measured on each rank: its local shards of every DTensor
        assert shard["params_held"] / shard["params_total"] == pytest.approx(0.5, abs=0.02)
        assert shard["optimizer_state_held"] / shard["optimizer_state_total"] == pytest.approx(0.5, abs=0.02)
    for shard in runs[2, "ddp"][1].shards:
        assert shard["params_held"] == shard["params_total"]


def test_a_stop_ends_the_ranks_within_seconds(lm, data):
    asked = []

    def stop_after_first_step(record):
        if record.get("step") == 1 and not asked:
            asked.append(time.perf_counter())
            request_stop("stopped by SIGINT")

    cfg = FT.model_copy(update={"processes": 2, "parallel": "fsdp", "epochs": 50, "patience": 50})
    try:
        with pytest.raises(RunInterrupted):
            train_lora(lm / "model", data.train, data.val, cfg, stop_after_first_step)
        assert asked and time.perf_counter() - asked[0] < 5
    finally:
        clear_stop()
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fsdp-rank-")]


def test_search_resumes_and_keeps_finished_trials(lm, data, tmp_path):
    cfg = FT.model_copy(update={"epochs": 1, "search": FinetuneSearchConfig(n_trials=1, epochs=[1], ranks=[4])})
    first = search_finetune(lm / "model", data, cfg, tmp_path, "key")
    more = cfg.model_copy(update={"search": cfg.search.model_copy(update={"n_trials": 2})})
    search_finetune(lm / "model", data, more, tmp_path, "key")
    import optuna

    [summary] = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2 and study.trials[0].params["lr"] == pytest.approx(first.lr)


def test_bad_input_is_one_error_before_training(lm, data):
    bad = FT.model_copy(update={"window": 100_000, "modules": ["q_proj", "query"]})
    with pytest.raises(ConfigError) as err:
        check_finetune(lm / "model", lm / "corpus", bad)
    message = str(err.value)
    assert "3 problem(s)" in message and "['query']" in message and "'q_proj'" in message
    assert "fewer than one training window of 100000 tokens" in message and "one validation window" in message
    with pytest.raises(FloatingPointError, match=r"diverged .* lower finetune\.lr"):
        train_lora(lm / "model", data.train, data.val, FT.model_copy(update={"lr": 1e20, "warmup": 0.0}))
    no_adapter = {**FINETUNED, "finetune": {"enabled": False}}
    with pytest.raises(ConfigError, match=r"\['int4_lora'\]: adapter 'separate' needs finetune.enabled"):
        parse_config(no_adapter)


FINETUNED = {
    **TINY,
    "data": {"window": 32, "max_windows": 3},
    "finetune": {
        **FT.model_dump(exclude={"search"}),
        "search": {"n_trials": 2, "epochs": [1, 2], "ranks": [8], "lr": [1e-2, 4e-2], "targets": ["attention+mlp"]},
    },
    "compress": {
        "candidates": {"int8": {"bits": 8}, "int4_lora": {"algorithm": "minmax", "adapter": "separate"}},
        "search": {"n_trials": 0},
    },
    "validate": {"prompt_lengths": [8], "new_tokens": 4, "rounds": 1},
    "register": {"model_name": "tiny-lm-ft"},
    "tracking": {"experiment": "e2e-lm-ft"},
}


@pytest.mark.e2e
def test_fine_tune_then_compress_gate_and_ship_beside_the_base_model(prefect_api, tmp_path):
    make_tiny_llama(tmp_path / "model", init_std=INIT_STD)
    write_corpus(tmp_path / "corpus", 40)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(FINETUNED))
    shipped = optimize_lm(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/.modelforge/mlflow.db")
    client = MlflowClient()
    run = client.get_run(shipped["run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and shipped["chosen"] == "int8"
    # The same held-out test text: the fine-tuned model at FP32 and INT8 beats the base at both.
    assert m["baseline.test_perplexity"] < 0.9 * m["base_fp32.test_perplexity"]
    assert m["int8.test_perplexity"] < 0.9 * m["base_int8.test_perplexity"]
    reports = {
        r["name"]: r
        for r in json.loads(mlflow.artifacts.load_text(f"runs:/{shipped['run_id']}/candidates/reports.json"))
    }
    # The separate adapter's candidate has no base twin (on the base model it would be plain INT4).
    assert set(reports) == {"baseline", "int8", "int4_lora", "base_fp32", "base_int8"}
    assert m["int4_lora.test_perplexity"] < 0.9 * m["base_fp32.test_perplexity"]
    assert all(any(g.startswith("reference") for g in reports[n]["failed_gates"]) for n in ("base_fp32", "base_int8"))
    assert m["finetune.best_val_perplexity"] < m["finetune.base_val_perplexity"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(shipped["run_id"], "finetune/adapter")
    }
    assert len(client.get_metric_history(shipped["run_id"], "finetune.train_loss")) > 1
    trials = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{shipped['run_id']}'")
    assert len(trials) == 2 and all(len(client.get_metric_history(t.info.run_id, "train_loss")) > 1 for t in trials)
    assert (tmp_path / "deploy" / "lm-bundle" / "model" / "model.onnx").is_file()


@pytest.mark.e2e
def test_a_diverging_fine_tune_fails_the_run_and_ships_nothing(prefect_api, tmp_path):
    make_tiny_llama(tmp_path / "model", init_std=INIT_STD)
    write_corpus(tmp_path / "corpus", 40)
    diverging = {**FINETUNED, "finetune": {**FT.model_dump(exclude={"search"}), "lr": 1e20, "warmup": 0.0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(diverging))
    with pytest.raises(FloatingPointError, match="diverged"):
        optimize_lm(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/.modelforge/mlflow.db")
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("e2e-lm-ft").experiment_id])
    assert run.info.status == "FAILED" and "diverged" in run.data.tags.get("error", "")
    assert not (tmp_path / "deploy").exists()
