"""Every model family passes one contract: built from a trial's parameters, it trains, exports to
ONNX with parity, survives a checkpoint, and structured pruning makes it physically smaller."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tasks.models import (
    FAMILIES,
    Arch,
    arch_from_params,
    build_model,
    count_params,
    load_checkpoint,
    save_checkpoint,
)
from tasks.onnx.export import export_onnx


@pytest.mark.parametrize(
    "arch",
    [
        Arch("mlp", 10, (1, 8, 8), hidden=(16, 16, 16)),
        Arch("cnn", 10, (1, 8, 8), conv=(4, 8, 16, 32), hidden=(8,)),  # deeper than the map can pool
    ],
)
def test_forward_shapes(arch):
    assert build_model(arch)(torch.zeros(3, *arch.input_shape)).shape == (3, 10)


def test_from_params_and_scaled():
    cnn = arch_from_params(
        {"family": "cnn", "depth": 3, "width": 64, "channels": 8, "activation": "gelu", "dropout": 0.2, "kernel": 5},
        10,
        (1, 8, 8),
    )
    assert cnn.conv == (8, 16, 32) and cnn.hidden == (64,) and cnn.kernel == 5
    model = build_model(cnn)
    assert any(isinstance(m, torch.nn.GELU) for m in model) and any(isinstance(m, torch.nn.Dropout) for m in model)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    small = cnn.scaled(0.5, depth=2)
    assert small.conv == (4, 8) and small.hidden == (32,)
    assert count_params(build_model(small)) < count_params(build_model(cnn)) / 3
    assert small.activation == "gelu" and small.kernel == 5
    mlp = arch_from_params({"family": "mlp", "depth": 2, "width": 40, "channels": 8}, 10, (1, 8, 8))
    assert mlp.conv == () and mlp.scaled(0.5, depth=3).hidden == (20, 20, 20)


def test_the_text_family_averages_a_seed_ensemble_whose_bags_drop_words_only_while_training():
    from tasks.models.text import MEMBERS

    torch.manual_seed(0)
    model = build_model(arch_from_params({"family": "text", "depth": 1, "width": 8, "dropout": 0.5}, 3, (6,), 20))
    x = torch.tensor([[2.0, 5, 7, 1, 0, 0], [3, 3, 19, 4, 6, 0]])
    members = list(model.members)
    assert len(members) == MEMBERS > 1 and not torch.equal(members[0][0].embed.weight, members[1][0].embed.weight)
    model.eval()
    assert torch.allclose(model(x), torch.stack([m(x) for m in members]).mean(0))
    bag = members[0][0]
    known = [[2, 5, 7], [3, 3, 19, 4, 6]]  # padding (0) and unknown words (1) are left out
    assert torch.allclose(bag(x), torch.stack([bag.embed.weight[ids].mean(0) for ids in known]))
    assert torch.equal(model(x), model(x))
    bag.train()
    assert not torch.allclose(torch.stack([bag(x) for _ in range(8)]).var(0), torch.zeros(2, 8))


def test_checkpoint_roundtrip_and_errors(tmp_path):
    arch = Arch("cnn", 10, (1, 8, 8), conv=(4,), hidden=(8,))
    model = build_model(arch)
    path = save_checkpoint(tmp_path / "m.pt", model, arch, {"k": 1})
    loaded, arch2, meta = load_checkpoint(path)
    assert arch2 == arch and meta == {"k": 1}
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable modelforge checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_old_checkpoints_without_new_fields_still_load(tmp_path):
    arch = Arch("mlp", 10, (1, 8, 8), hidden=(8,))
    d = arch.to_dict()
    for k in ("activation", "dropout", "kernel"):
        d.pop(k)
    assert Arch.from_dict(d) == arch


PARAMS = {"depth": 2, "width": 16, "channels": 4, "spec": "user_models:small_resnet"}
SAMPLES = {"mlp": (6,), "cnn": (1, 8, 8), "resnet": (1, 8, 8), "text": (10,), "custom": (1, 8, 8), "hf": (10,)}


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory) -> str:
    from user_models import tiny_bert

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
    return str(tiny_bert(tmp_path_factory.mktemp("bert"), [words, words.upper()] * 5))


def test_every_family_is_covered():
    assert set(FAMILIES) == set(SAMPLES)


@pytest.mark.parametrize("family", sorted(SAMPLES))
def test_family_contract(family, tmp_path, local_checkpoint):
    from tasks.compress.base import CompressContext, ModelState
    from tasks.compress.distill import Distill, distill
    from tasks.compress.structured_prune import StructuredPrune, structured_prune
    from tasks.data.base import Splits
    from tasks.train.loop import TrainParams, accuracy, fit
    from tasks.train.stage import TrainConfig

    shape, gen = SAMPLES[family], np.random.default_rng(0)
    tokens = family in ("text", "hf")
    x = (gen.integers(0, 24, (48, *shape)) if tokens else gen.normal(size=(48, *shape))).astype(np.float32)
    y = (x.reshape(48, -1).sum(1) > np.median(x.reshape(48, -1).sum(1))).astype(np.int64)
    arch = arch_from_params(
        {"family": family, **PARAMS, "pretrained": local_checkpoint}, 2, shape, vocab=30 if family == "text" else 0
    )
    torch.manual_seed(0)
    model = build_model(arch)

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model.eval()(torch.from_numpy(x)), torch.from_numpy(y)).item()

    untrained, weights = loss(), {k: p.detach().clone() for k, p in model.named_parameters()}
    fit(
        model,
        (x, y),
        (x, y),
        TrainParams(lr=0.01, optimizer="adam", epochs=2, patience=2, batch_size=16),
        restore_best=False,
    )
    # It trains: two epochs lower the loss on what it trained on, and the optimizer moved the weights
    # (BatchNorm's running statistics alone also change an eval-mode loss).
    assert loss() < untrained
    assert any(not torch.equal(p, weights[k]) for k, p in model.named_parameters())
    assert model(torch.from_numpy(x[:3])).shape == (3, 2)
    assert export_onnx(model, tmp_path / "model.onnx", x[:8]).parity_max_abs < 1e-4
    ckpt = save_checkpoint(tmp_path / "model.pt", model, arch, {"train": {"lr": 0.01, "optimizer": "adam"}})

    manifest = {"num_classes": 2, "input_shape": list(shape), "preprocessing": {"vocab_size": 30}}
    splits = Splits((x, y), (x, y), (x, y), 2, manifest)
    ctx = CompressContext(splits, TrainConfig(), ckpt, tmp_path / "pruned")
    state = structured_prune(
        ModelState(ckpt), StructuredPrune(method="structured_prune", amount=0.5, finetune_epochs=1), ctx
    )
    pruned, _, _ = load_checkpoint(state.checkpoint)
    assert count_params(pruned) < 0.7 * count_params(model)
    assert accuracy(pruned, x, y) == state.info["structured_prune"]["val_acc_finetuned"]  # its weights, reloaded
    assert export_onnx(pruned, tmp_path / "pruned.onnx", x[:8]).parity_max_abs < 1e-4

    # distillation: the teacher's scaled-down twin by default, or a named built-in student for any teacher
    # distillation: the teacher's scaled-down or shallower twin by default, or a named built-in student for any teacher
    student = {"family": "text" if tokens else "mlp", "width": 8, "depth": 1}
    recipes = [Distill(method="distill", epochs=1, student=student)]
    if FAMILIES[family].scales or FAMILIES[family].shallower:
        recipes.append(Distill(method="distill", epochs=1))
    else:
        with pytest.raises(ValueError, match="no scaled-down twin"):
            distill(ModelState(ckpt), Distill(method="distill", epochs=1), ctx)
    for recipe in recipes:
        taught, _, _ = load_checkpoint(distill(ModelState(ckpt), recipe, ctx).checkpoint)
        assert count_params(taught) < count_params(model)
        assert export_onnx(taught, tmp_path / "student.onnx", x[:8]).parity_max_abs < 1e-4


def test_a_hugging_face_student_starts_from_the_teachers_layers(local_checkpoint):
    from tasks.models.hf import shallower_twin

    teacher_arch = arch_from_params({"family": "hf", "pretrained": local_checkpoint}, 3, (10,))
    teacher = build_model(teacher_arch)
    student, arch = shallower_twin(teacher, teacher_arch, None)
    assert arch.layers == (0,) and len(student.hf.bert.encoder.layer) == 1  # half of the tiny BERT's 2
    kept, first = student.hf.bert.encoder.layer[0].state_dict(), teacher.hf.bert.encoder.layer[0].state_dict()
    assert all(torch.equal(kept[k], first[k]) for k in first)
    assert len(teacher.hf.bert.encoder.layer) == 2  # the teacher is untouched
    assert shallower_twin(teacher, teacher_arch, 2)[1].layers == (0, 1)
    rebuilt = build_model(arch)  # a checkpoint of the student rebuilds it from the pretrained folder
    assert len(rebuilt.hf.bert.encoder.layer) == 1 and rebuilt.hf.config.num_hidden_layers == 1


def test_a_hugging_face_graph_takes_input_ids_and_attention_mask(local_checkpoint, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tasks.onnx.runtime import PAD_KEY, make_session, predict_logits

    model = build_model(arch_from_params({"family": "hf", "pretrained": local_checkpoint}, 3, (10,))).eval()
    x = np.zeros((4, 10), np.float32)
    x[:, :6] = np.random.default_rng(0).integers(5, 24, (4, 6))  # 6 tokens, then padding
    path = export_onnx(model, tmp_path / "hf.onnx", x).path
    session = make_session(path)
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)", ["batch", "tokens"]),
        ("attention_mask", "tensor(int64)", ["batch", "tokens"]),
    ]
    assert session.get_modelmeta().custom_metadata_map[PAD_KEY] == "0"
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    ids = x[:, :7].astype(np.int64)  # what an HF runtime feeds: shorter sequences, its own mask
    got = session.run(None, {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    quantize_dynamic(str(path), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    int8 = make_session(tmp_path / "int8.onnx")  # the padding id survives quantization, so the mask does
    assert np.abs(predict_logits(int8, x) - expected).max() < 0.1


def test_custom_module_loads_pretrained_weights_and_refuses_ones_that_do_not_fit(tmp_path):
    arch = arch_from_params({"family": "custom", **PARAMS}, 3, (1, 8, 8))
    pretrained = build_model(arch)
    save_file(pretrained.state_dict(), tmp_path / "w.safetensors")
    torch.save(pretrained.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        loaded = build_model(Arch(**{**arch.to_dict(), "weights": str(tmp_path / weights)}))
        assert all(
            torch.equal(a, b)
            for a, b in zip(loaded.state_dict().values(), pretrained.state_dict().values(), strict=True)
        )
    with pytest.raises(ValueError, match=r"fc.weight: \(3, 16\) in the file, \(5, 16\) in the model"):
        build_model(Arch(**{**arch.to_dict(), "num_classes": 5, "weights": str(tmp_path / "w.pt")}))
    torch.save(pretrained, tmp_path / "pickled.pt")  # a whole pickled module: refused, never unpickled
    with pytest.raises(ValueError, match="not a state_dict"):
        build_model(Arch(**{**arch.to_dict(), "weights": str(tmp_path / "pickled.pt")}))
