"""MiniLM building blocks on a 1-layer truncated copy of the packaged model (keeps CI fast)."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tasks.data.docstrings import offline_corpus
from tasks.encoder.minilm import (
    SESSION_UNFUSED,
    distill_encoder,
    encode_onnx,
    encode_torch,
    export_encoder,
    fidelity,
    load_minilm,
    make_student,
    optimize_encoder,
    quantize_encoder,
    tokenize,
)
from tasks.onnx.runtime import make_session, session_unfused


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = load_minilm(num_layers=1)
    sentences = offline_corpus(80)
    exported = export_encoder(model, tok, tmp_path_factory.mktemp("minilm") / "fp32.onnx", sentences[:16])
    return model, tok, sentences, exported


def test_packaged_model_loads_offline_and_truncates():
    model, tok = load_minilm(num_layers=1)
    assert len(model.bert.encoder.layer) == 1 and tok("hello world")["input_ids"][0] == tok.cls_token_id


def test_export_matches_pytorch_with_dynamic_batch_and_sequence(tiny):
    model, tok, sentences, exported = tiny
    assert exported.min_cosine >= 0.9999
    onnx.checker.check_model(str(exported.path))
    session = make_session(exported.path)
    for batch, length in ((1, 8), (5, 40), (3, 128)):
        feeds = tokenize(tok, sentences[:batch], max_length=length, pad_to_max=True)
        got = session.run(None, feeds)[0]
        assert got.shape == (batch, 384)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in the graph
        assert (got * encode_torch(model, feeds)).sum(1).min() >= 0.9999


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_optimized_and_int8_variants_stay_faithful(tiny, tmp_path):
    _, tok, sentences, exported = tiny
    fused = optimize_encoder(exported.path, tmp_path / "opt.onnx")
    assert fused.get("Attention") == 1 and fused.get("LayerNormalization", 0) >= 3  # the TorchScript graph fuses
    assert not fused.keys() & {"SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"}
    int8 = quantize_encoder(tmp_path / "opt.onnx", tmp_path / "int8.onnx")
    assert _ops(int8)["QAttention"] == 1 and session_unfused(int8) == list(SESSION_UNFUSED)
    assert exported.path.stat().st_size / int8.stat().st_size > 3.5
    ref = encode_onnx(exported.path, tok, sentences)
    opt = fidelity(ref, encode_onnx(tmp_path / "opt.onnx", tok, sentences), queries=20)
    assert opt["cosine_min"] >= 0.9999 and opt["top10_overlap"] == 1.0
    q = fidelity(ref, encode_onnx(int8, tok, sentences), queries=20)
    assert 0.95 < q["cosine_min"] <= q["cosine_mean"] < 1.0  # INT8 perturbs, but stays close
    assert q["top10_overlap"] >= 0.6


def test_sessions_keep_the_fusions_the_encoder_opts_out_of(tiny, tmp_path):
    """ORT would fuse Add + LayerNormalization into its slower SkipLayerNormalization again at
    session start; the model's own list stops it wherever the file is loaded."""
    _, _, _, exported = tiny
    optimize_encoder(exported.path, tmp_path / "opt.onnx")
    int8 = quantize_encoder(tmp_path / "opt.onnx", tmp_path / "int8.onnx")
    make_session(int8, save_optimized=tmp_path / "ours.onnx")
    make_session(int8.read_bytes(), save_optimized=tmp_path / "ours_bytes.onnx")
    plain = ort.SessionOptions()
    plain.optimized_model_filepath = str(tmp_path / "plain.onnx")
    ort.InferenceSession(str(int8), plain, providers=["CPUExecutionProvider"])
    assert _ops(tmp_path / "plain.onnx")["SkipLayerNormalization"] >= 1  # what the list prevents
    for ran in ("ours.onnx", "ours_bytes.onnx"):
        ops = _ops(tmp_path / ran)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] >= 3 and ops["QAttention"] == 1


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 16))
    same = fidelity(ref, ref.copy(), queries=10)
    assert same == {"cosine_mean": pytest.approx(1.0), "cosine_min": pytest.approx(1.0), "top10_overlap": 1.0}
    noisy = ref.copy()
    noisy[3] = -noisy[3]  # one sentence flipped: the worst case sees it, the mean barely does
    worst = fidelity(ref, noisy, queries=10)
    assert worst["cosine_min"] == pytest.approx(-1.0) and worst["cosine_mean"] > 0.9
    unrelated = fidelity(ref, rng.normal(size=(50, 16)), queries=10)
    assert unrelated["top10_overlap"] < 0.5


def test_offline_corpus_is_deterministic_text():
    a, b = offline_corpus(200), offline_corpus(200)
    assert a == b and len(set(a)) == 200
    assert all(6 <= len(s.split()) <= 40 for s in a)
    with pytest.raises(ValueError, match="requested"):
        offline_corpus(10**7)


def test_distilled_student_learns_to_match_the_teacher(tmp_path):
    teacher, tok = load_minilm(num_layers=2)
    corpus = offline_corpus(240)
    train, held_out = corpus[:160], corpus[160:]
    ref = encode_torch(teacher, tokenize(tok, held_out))
    untrained = make_student(teacher, keep=(0,))
    before = fidelity(ref, encode_torch(untrained, tokenize(tok, held_out)), queries=20)
    student, history = distill_encoder(teacher, tok, train, keep=(0,), epochs=3, lr=2e-4, batch=16)
    after = fidelity(ref, encode_torch(student, tokenize(tok, held_out)), queries=20)
    assert len(student.bert.encoder.layer) == 1 and history[-1] < history[0]
    assert after["cosine_mean"] > before["cosine_mean"]  # on sentences it never trained on
    exported = export_encoder(student, tok, tmp_path / "student.onnx", held_out[:8])
    assert exported.min_cosine >= 0.9999
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        make_student(teacher, keep=(0, 5))
