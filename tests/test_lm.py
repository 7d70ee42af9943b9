"""The causal-LM family on a tiny random Llama built in the test: corpus -> FP32 ONNX for generation ->
searched and fixed weight-only candidates -> gates -> registry -> contract bundle -> champion; and the
up-front refusals (bad corpus, bad model folder, pickled weights)."""

import json
from pathlib import Path
from pydoc_data.topics import topics

import mlflow
import numpy as np
import onnx
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.lm import optimize_lm
from tasks.config import load_config
from tasks.core.settings import ConfigError
from tasks.data.base import DataError
from tasks.data.corpus import CorpusConfig, describe_corpus, load_corpus
from tasks.init_config import init_config
from tasks.lm.evaluate import make_lm_session, window_feeds, window_logits
from tasks.lm.quantize import LMRecipe, node_bits
from tasks.lm.release import LMGateConfig, LMPromoteConfig, paired_perplexity
from tasks.lm.search import LMCompressConfig
from tasks.release.guard import bundle_problem, sha256_of
from tasks.release.promote import decide
from tasks.release.validate import Report, best_passing
from tests.tiny_llm import make_tiny_llama, snap_to_q4_1

TINY = {
    "family": "causal_lm",
    "lm": {"model": "model", "max_length": 128},
    "data": {"window": 64, "max_windows": 3},
    # int8 keeps the tiny model's argmax; int4 everywhere (lm_head too) must fail the top-1 gate.
    "compress": {
        "candidates": {"int8": {"bits": 8}, "int4": {"bits": 4, "lm_head": "int4"}},
        "search": {"n_trials": 1, "keep": 1, "trial_windows": 1},
    },
    "validate": {"prompt_lengths": [8, 32], "new_tokens": 8, "rounds": 1},
    "gates": {"select_by": "size_bytes"},
    "register": {"model_name": "tiny-lm"},
    "tracking": {"experiment": "e2e-lm"},
}


def genai_fp32(hf: Path, out: Path) -> Path:
    """`hf`'s FP32 generation folder (context 64), as the flow exports it before anything is quantized."""
    from tasks.lm.export import build_genai, finish_folder

    build_genai(hf, out)
    finish_folder(hf, out, 64)
    return out


def write_corpus(folder, n=60):
    folder.mkdir(parents=True, exist_ok=True)
    for key in sorted(topics)[:n]:
        (folder / f"{key}.txt").write_text(topics[key])
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-project")
    make_tiny_llama(root / "model")
    write_corpus(root / "corpus")
    (root / "config.yaml").write_text(yaml.safe_dump(TINY))
    return root


@pytest.fixture(scope="module")
def shipped(project, prefect_api):
    return optimize_lm(config_path=str(project / "config.yaml"), root=str(project))


@pytest.mark.e2e
def test_lm_run_ships_the_contract_bundle(project, shipped):
    bundle = project / "deploy" / "lm-bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "modelforge-bundle/1" and manifest["family"] == "causal_lm"
    assert manifest["model_dir"] == "model" and manifest["max_length"] == 128
    assert manifest["candidate"] == shipped["chosen"] == "int8" and manifest["version"] == shipped["version"]
    on_disk = {str(p.relative_to(bundle)) for p in (bundle / "model").rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk and all(sha256_of(bundle / f) == h for f, h in manifest["files"].items())
    assert bundle_problem(bundle) is None  # a later ship may replace it
    model = bundle / "model"
    assert json.loads((model / "genai_config.json").read_text())["search"]["max_length"] == 128
    assert "im_start" in json.loads((model / "tokenizer_config.json").read_text())["chat_template"]
    assert (model / "generation_config.json").is_file()
    ops = {n.op_type for n in onnx.load(str(model / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "SimplifiedLayerNormalization"} <= ops

    import onnxruntime_genai as og  # the shipped folder generates

    og_model = og.Model(str(model))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=24, min_length=24, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(og.Tokenizer(og_model).encode("The for statement"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 24


@pytest.mark.e2e
def test_lm_gates_registry_and_search(project, shipped):
    mlflow.set_tracking_uri(f"sqlite:///{project}/.modelforge/mlflow.db")
    client = MlflowClient()
    run = client.get_run(shipped["run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m["baseline.top1"] == 1.0 and m["baseline.kl"] < 1e-3 and m["baseline.parity_max_abs"] < 1e-3
    assert m["int8.passed"] == 1.0 and m["int8.top1"] >= 0.9 and m["int8.size_bytes"] < 0.7 * m["baseline.size_bytes"]
    assert m["int4.passed"] == 0.0 and m["int4.size_bytes"] < m["int8.size_bytes"]
    assert {
        "baseline.ttft_8_ms",
        "baseline.ttft_32_ms",
        "int8.decode_8_tok_s",
        "int8.peak_mb",
        "baseline.kv_cache_mb",
    } <= set(m)
    reports = {
        r["name"]: r
        for r in json.loads(mlflow.artifacts.load_text(f"runs:/{shipped['run_id']}/candidates/reports.json"))
    }
    assert any(g.startswith("top-1 agreement") for g in reports["int4"]["failed_gates"])
    # select_by latency's paired tie rule compares candidates round by round (validate.rounds is 1 here)
    assert len(reports["int8"]["latency_rounds_ms"]) == 1
    # The KV cache sized to max_length: 2 (k, v) x 2 layers x 2 KV heads x 16 dims x 128 positions x 4 bytes.
    assert m["baseline.kv_cache_mb"] == pytest.approx(2 * 2 * 2 * 16 * 128 * 4 / 2**20)

    sensitivity = json.loads(mlflow.artifacts.load_text(f"runs:/{shipped['run_id']}/candidates/layer_sensitivity.json"))
    assert sorted(r["layer"] for r in sensitivity) == [0, 1]
    compression = json.loads(mlflow.artifacts.load_text(f"runs:/{shipped['run_id']}/candidates/compression.json"))
    assert any(name.startswith("trial_") for name in compression)  # the searched candidate was validated too
    [study] = optuna.get_all_study_summaries(f"sqlite:///{project}/.modelforge/lm/search/optuna.db")
    assert study.n_trials == 1

    version = client.get_model_version_by_alias("tiny-lm", "champion")
    assert str(version.version) == shipped["version"] and shipped["promoted"]
    files = {f.path for f in client.list_artifacts(shipped["run_id"], "model")}
    assert {
        "model/genai_config.json",
        "model/tokenizer_config.json",
        "model/generation_config.json",
        "model/model.onnx",
    } <= files
    assert float(version.tags["top1"]) == pytest.approx(m["int8.top1"], rel=1e-4)
    assert (project / "deploy" / "lm-champion" / "model" / "model.onnx").is_file()

    corpus = load_corpus(project / "corpus")
    assert all(corpus.values()) and not set(corpus["test"]) & set(corpus["calibration"])


def test_mixed_precision_keeps_the_most_sensitive_layers_at_int8(project, shipped):
    model = onnx.load(str(project / "deploy" / "lm-bundle" / "model" / "model.onnx"), load_external_data=False)
    # node_bits reads MatMul names; rebuild the FP32 names from the quantized graph's.
    fp32 = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node(
                    "MatMul", ["x", f"w{i}"], [f"y{i}"], name=n.name.removesuffix("_Q8").removesuffix("_Q4")
                )
                for i, n in enumerate(model.graph.node)
                if n.op_type == "MatMulNBits"
            ],
            "g",
            [],
            [],
            [
                onnx.numpy_helper.from_array(np.zeros((1, 1), np.float32), f"w{i}")
                for i, n in enumerate(model.graph.node)
                if n.op_type == "MatMulNBits"
            ],
        )
    )
    plan = node_bits(fp32, LMRecipe(bits=4, lm_head="fp32", int8_layers=1), sensitive=[1, 0])
    assert plan["/lm_head/MatMul"] is None
    assert {b for n, b in plan.items() if "/layers.1/" in n} == {8}
    assert {b for n, b in plan.items() if "/layers.0/" in n} == {4}


def test_champion_challenger_rule_is_a_paired_test_on_the_same_windows():
    """An LM challenger is promoted on evidence: lower test perplexity by a paired bootstrap over the same
    test windows, or a matching perplexity and a decode speed-up whose interval over rounds lies above 1.05."""
    rng = np.random.default_rng(0)
    champion_nll = rng.normal(2.3, 0.2, 16)

    def window(shift, noise):
        jitter = rng.normal(0, noise, 16)
        nll = champion_nll + shift + jitter - jitter.mean()  # noise that averages out: `shift` is the whole effect
        return {"window_nll": list(nll), "perplexity": float(np.exp(nll.mean()))}

    champion = {"window_nll": list(champion_nll), "perplexity": float(np.exp(champion_nll.mean()))}
    cfg = LMPromoteConfig()
    slower, faster = {"speedup": 0.5, "interval": [0.45, 0.55]}, {"speedup": 1.3, "interval": [1.2, 1.4]}
    better = paired_perplexity(window(-0.1, 0.01), champion)  # about 10% lower on every window
    assert better["interval_pts"][0] > 0 and decide(better, slower, cfg)[0]
    tie = paired_perplexity(window(0.0, 0.05), champion)  # the same model up to noise
    assert tie["interval_pts"][0] < 0 < tie["interval_pts"][1]
    assert not decide(tie, {"speedup": 1.2, "interval": [0.9, 1.5]}, cfg)[0]  # faster on paper: noise
    assert decide(tie, faster, cfg)[0]
    assert not decide(paired_perplexity(window(0.05, 0.01), champion), faster, cfg)[0]  # 5% worse: no speed-up pays


@pytest.mark.e2e
def test_another_model_never_replaces_the_champion_folder(project, shipped, tmp_path):
    """A second LM config that names its own model but keeps the default champion folder is refused right after
    its data is versioned (before any export or quantization), and the champion folder keeps tiny-lm's bundle;
    `init` names the folders after the config, so its configs never share them."""
    from tasks.release.promote import PromotionError, folder_conflict

    champion = project / "deploy" / "lm-champion" / "manifest.json"
    before = champion.read_text()
    assert json.loads(before)["task"]["split"]["test_fraction"] == CorpusConfig.model_fields["test_fraction"].default
    runs = project / ".modelforge" / "lm" / "candidates"
    candidates = set(runs.iterdir())
    assert json.loads(before)["registered_model"]["name"] == "tiny-lm"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "register": {"model_name": "other-lm"}}))
    with pytest.raises(PromotionError, match="serves the champion of 'tiny-lm', not 'other-lm'"):
        optimize_lm(config_path=str(other), root=str(project))
    assert champion.read_text() == before and set(runs.iterdir()) == candidates  # nothing exported for that run
    older = tmp_path / "older-champion"  # an LM bundle shipped before manifests named the registered model
    older.mkdir()
    (older / "manifest.json").write_text(json.dumps({"family": "causal_lm", "model_name": "tiny-lm"}))
    assert "serves the champion of 'tiny-lm'" in (folder_conflict("other-lm", older) or "")
    cfg = load_config(init_config(project / "corpus", None, "model", project / "configs" / "second.yaml", project))
    assert (cfg.register_.bundle_dir, cfg.promote.champion_bundle_dir) == (
        Path("deploy/second-bundle"),
        Path("deploy/second-champion"),
    )


def test_bad_corpus_is_one_data_error(project, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Only a few words here.")
    (corpus / "empty.md").write_text("  \n")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (corpus / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (corpus / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError) as err:
        describe_corpus(CorpusConfig(window=64, model=project / "model"), corpus)
    message = str(err.value)
    for expected in (
        "empty.md: empty document",
        "latin1.txt: not UTF-8",
        "docs.jsonl line 2",
        "table.csv: not a .txt",
        "fewer than one evaluation window of 65",
    ):
        assert expected in message, expected


def test_bad_model_folders_are_refused_before_the_data(project, prefect_api, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    write_corpus(tmp_path / "corpus", 5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "lm": {"model": "bad", "max_length": 128}}))
    with pytest.raises(ConfigError) as err:
        optimize_lm(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))
    message = str(err.value)
    for expected in (
        "pickled weights are refused",
        "pytorch_model.bin",
        "no *.safetensors",
        "BertForMaskedLM",
        "no tokenizer.json",
    ):
        assert expected in message, expected
    assert not (tmp_path / "corpus.dvc").exists()  # nothing was versioned


def test_init_writes_a_causal_lm_config(project, tmp_path):
    out = init_config(project / "corpus", None, "model", project / "configs" / "mine.yaml", project)
    cfg = load_config(out)
    assert (cfg.family == "causal_lm" and cfg.lm.model == project / "model") or str(cfg.lm.model) == "model"
    assert "max_ppl_increase_pct" in out.read_text() and "# " in out.read_text()


def test_lm_candidates_are_picked_by_decode_latency_with_the_tie_rule():
    """The LM gates' default (select_by latency_p50_ms, ms per token over the interleaved rounds) picks
    like every family's: clearly faster wins, within the tie the better top-1 agreement wins."""

    def report(name, top1, rounds_ms):
        return Report(
            name,
            name,
            {"top1": top1},
            "top1",
            min(rounds_ms),
            max(rounds_ms),
            1000 / min(rounds_ms),
            1000,
            None,
            latency_rounds_ms=tuple(rounds_ms),
        )

    fp32, int8 = report("fp32", 1.0, [10.0, 10.4, 9.8, 10.1]), report("int8", 0.96, [6.0, 6.2, 5.9, 6.1])
    assert best_passing([fp32, int8], LMGateConfig()).name == "int8"
    near = report("int4", 0.93, [5.9, 6.3, 5.8, 6.2])  # a tie with int8: its better top-1 decides
    assert best_passing([fp32, int8, near], LMGateConfig()).name == "int8"


def test_minmax_int4_is_exact_on_a_q4_1_grid(tmp_path):
    """Weights snapped onto llama.cpp's Q4_1 grid (per 32 inputs: fp16 minimum and step, 16 levels), as the
    GGUF's dequantized weights are, come back through minmax INT4 (the fast symmetric kernel, the per-block
    offsets in rows read through the input's appended block sums) to float error; symmetric RTN cannot
    represent them."""
    from tasks.lm.quantize import quantize_lm

    hf = snap_to_q4_1(make_tiny_llama(tmp_path / "hf"))
    fp32 = genai_fp32(hf, tmp_path / "fp32")
    ids = np.arange(5, 45, dtype=np.int64)
    reference = window_logits(make_lm_session(fp32, 1), ids)
    diffs = {}
    for name, recipe in {
        "minmax": LMRecipe(algorithm="minmax", lm_head="fp32"),
        "minmax_acc4": LMRecipe(algorithm="minmax", accuracy_level=4, lm_head="fp32"),
        "rtn": LMRecipe(algorithm="rtn", symmetric=True, lm_head="fp32"),
    }.items():
        folder = quantize_lm(fp32, recipe, tmp_path / name, sensitive=[])
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 5  # qkv, o, gate, up, down
        if name.startswith("minmax"):  # one block-sum MatMul + Concat per activation read: qkv, o, gate+up, down
            assert sum(n.op_type == "Concat" for n in graph.node) == 2 * 4
            assert not any(n.op_type == "Add" for n in graph.node)
        diffs[name] = np.abs(window_logits(make_lm_session(folder, 1), ids) - reference).max()
    assert diffs["minmax"] < 1e-3 < diffs["rtn"], diffs
    assert diffs["minmax_acc4"] < diffs["rtn"], diffs  # int8 activations: close, not exact
    with pytest.raises(ValueError, match="4 bits in blocks of 32"):
        LMRecipe(algorithm="minmax", block_size=64)
    with pytest.raises(ValueError, match=r"minmax needs search\.bits"):
        LMCompressConfig(search={"algorithms": ["rtn", "minmax"]})


def test_lm_search_measures_each_model_once(project, tmp_path):
    """HQQ does not read `symmetric` (it always fits a zero point), and the lm_head stays FP32: the space below
    writes one model however a trial is drawn. The first trial measures it; the others reuse its scores (no
    second timing) and the search returns one candidate, not three copies of it."""
    from tasks.lm.evaluate import LMEval
    from tasks.lm.release import LMValidateConfig
    from tasks.lm.search import LMSearchConfig, search_lm

    corpus = write_corpus(tmp_path / "corpus")
    describe_corpus(CorpusConfig(window=64, model=project / "model"), corpus)
    fp32 = genai_fp32(project / "model", tmp_path / "fp32")
    space = LMSearchConfig(
        n_trials=3,
        bits=[4],
        algorithms=["hqq"],
        block_sizes=[32],
        symmetric=[True, False],
        accuracy_levels=[0],
        lm_head=["fp32"],
        int8_layers=[0],
        trial_windows=1,
        keep=3,
    )
    timing = LMValidateConfig(prompt_lengths=[8], new_tokens=4, rounds=1)
    found = search_lm(fp32, LMEval(corpus, fp32, 64, 1, 1), space, timing, 64, [], 100.0, tmp_path / "work", "k")
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'work' / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and len({t.user_attrs["weights"] for t in trials}) == 1
    assert [t.values for t in trials[1:]] == [trials[0].values] * 2  # reused: timings never repeat exactly
    assert [name for name, _ in found] == ["trial_0"]


def test_minmax_takes_rtn_where_a_matmul_has_no_whole_blocks(tmp_path):
    """An MLP 144 wide: the down projections' 144 inputs are not whole blocks of 32, so they take symmetric RTN
    while every other projection keeps minmax (the default candidate must finish on any model)."""
    from tasks.lm.quantize import quantize_lm

    hf = make_tiny_llama(tmp_path / "hf", intermediate_size=144)
    fp32 = genai_fp32(hf, tmp_path / "fp32")
    folder = quantize_lm(fp32, LMRecipe(algorithm="minmax", accuracy_level=4), tmp_path / "minmax", sensitive=[])
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    reads = {n.name: n.input for n in graph.node if n.op_type == "MatMulNBits" and "/layers." in n.name}
    plain = sorted(name for name, inputs in reads.items() if not inputs[0].endswith("_with_blocksums"))
    assert len(reads) == 2 * 5 and plain == [f"/model/layers.{i}/mlp/down_proj/MatMul_Q4" for i in range(2)], plain
    assert all(len(reads[name]) == 3 for name in plain)  # symmetric: no zero points
    ids = np.arange(5, 45, dtype=np.int64)
    assert np.isfinite(window_logits(make_lm_session(folder, 1), ids)).all()


def test_k_quant_blocks_pack_for_every_block_count(tmp_path):
    """k-quant at every block size computes what its own blocks say: the model's logits equal those of the FP32
    model with each weight replaced by its k-quant blocks dequantized. The tiny model's 64, 96 and 128 inputs
    make 1 or 3 blocks per column at some sizes: odd counts, whose 4-bit zero points ORT's packer ran together
    across columns (a ValueError at quantization before). 8 bits (uint8 zero points, one per block) is checked
    at float activations, which `quantize_lm` never uses for 8 bits but the layout is the same."""
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    from tasks.lm.grid import kquant_pass
    from tasks.lm.quantize import LM_HEAD, quantize_lm

    def saved(model: onnx.ModelProto, fp32: Path, name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for path in fp32.iterdir():
            if not path.name.startswith("model.onnx"):
                (folder / path.name).symlink_to(path)
        onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        return folder

    ids = np.arange(5, 45, dtype=np.int64)
    bases = {}
    # tied: the embedding is gathered from the head's blocks (the reference's: its table); 96: 3 blocks of 32
    for tied, width in ((False, 128), (True, 128), (False, 96)):
        hf = make_tiny_llama(tmp_path / f"hf-{tied}-{width}", tied=tied, intermediate_size=width)
        bases[tied, width] = genai_fp32(hf, tmp_path / f"fp32-{tied}-{width}")
    for bits, block, tied, width in (
        (4, 32, False, 128),
        (4, 64, False, 128),
        (4, 128, False, 128),
        (4, 64, True, 128),
        (4, 32, False, 96),
        (8, 64, False, 96),
    ):
        case, fp32 = f"{bits}-{block}-{tied}-{width}", bases[tied, width]
        recipe = LMRecipe(algorithm="k_quant", bits=bits, block_size=block, lm_head=f"int{bits}")
        expected = onnx.load(str(fp32 / "model.onnx"))
        plan = node_bits(expected, recipe, [])
        assert plan[LM_HEAD] == bits
        if bits == 4:
            folder = quantize_lm(fp32, recipe, tmp_path / case, sensitive=[])
        else:
            include = {name for name, b in plan.items() if b}
            folder = saved(kquant_pass(onnx.load(str(fp32 / "model.onnx")), include, bits, block, 0), fp32, case)
        weights = {i.name: i for i in expected.graph.initializer}
        for node in expected.graph.node:
            if plan.get(node.name) == bits:
                w = numpy_helper.to_array(weights[node.input[1]])
                k, n = w.shape
                padded = np.zeros((-(-k // block) * block, n), np.float32)
                padded[:k] = w
                q, scale, zero = quant_tensor_k_quant_cpu(padded.T, bits, block)
                dequantized = ((q - zero) * scale).reshape(n, -1)[:, :k].T.astype(np.float32)
                weights[node.input[1]].CopyFrom(numpy_helper.from_array(dequantized, node.input[1]))
        got = window_logits(make_lm_session(folder, 1), ids)
        want = window_logits(make_lm_session(saved(expected, fp32, f"{case}-dequantized"), 1), ids)
        assert np.abs(got - want).max() < 1e-4, case


@pytest.mark.e2e
def test_a_tied_embedding_is_gathered_from_the_quantized_lm_head(tmp_path):
    """A checkpoint that ties its token embedding to the lm_head keeps one quantized copy: the embedding rows
    are gathered from the head's blocks (no FP32 table left in the file), each row exactly the head's row
    dequantized; a minmax head (an offset the gather cannot read), an HQQ one (float zero points, which the
    gather does not take) and an FP32 head keep the FP32 table, and each model loads."""
    from onnx import helper, numpy_helper

    from tasks.lm.quantize import quantize_lm

    hf = make_tiny_llama(tmp_path / "hf", tied=True)
    fp32 = genai_fp32(hf, tmp_path / "base")
    ids = np.arange(5, 45, dtype=np.int64)
    sizes = {}
    for name, recipe in {
        "int8": LMRecipe(lm_head="int8"),
        "int4": LMRecipe(lm_head="int4"),
        "minmax4": LMRecipe(algorithm="minmax", lm_head="int4"),
        "hqq4": LMRecipe(algorithm="hqq", lm_head="int4"),
        "fp32": LMRecipe(lm_head="fp32"),
    }.items():
        folder = quantize_lm(fp32, recipe, tmp_path / name, sensitive=[])
        sizes[name] = (folder / "model.onnx.data").stat().st_size
        model = onnx.load(str(folder / "model.onnx"))
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        tables = [w for w in weights.values() if w.dtype == np.float32 and sorted(w.shape) == [64, 512]]
        gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
        if name in ("minmax4", "hqq4", "fp32"):
            assert len(tables) == 1 and not gathers, name
            window_logits(make_lm_session(folder, 1), ids)
            continue
        assert not tables and len(gathers) == 1, name
        [head] = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
        blocks, scales = weights[head.input[1]], weights[head.input[2]].reshape(512, 2, 1)
        if recipe.lm_head == "int8":
            levels = blocks.astype(np.float32) - 128
        else:  # two 4-bit values a byte, the even one in the low nibble
            levels = np.stack([blocks & 15, blocks >> 4], -1).reshape(512, 2, 32).astype(np.float32) - 8
        rows = (levels * scales).reshape(512, 64)[ids]
        # The gathered rows, read as an extra output of the same graph.
        model.graph.output.append(helper.make_tensor_value_info(gathers[0].output[0], onnx.TensorProto.FLOAT, None))
        probe = tmp_path / f"{name}-probe"
        probe.mkdir()
        for path in folder.iterdir():
            if path.name != "model.onnx":
                (probe / path.name).symlink_to(path)
        onnx.save(model, str(probe / "model.onnx"), save_as_external_data=True, location="probe.onnx.data")
        lm = make_lm_session(probe, 1)
        gathered = lm.session.run([gathers[0].output[0]], window_feeds(lm, ids))[0][0]
        assert np.array_equal(gathered, rows), name
    assert sizes["int8"] < 512 * 64 * 4 < sizes["minmax4"], sizes  # the whole int8 file is smaller than the table
