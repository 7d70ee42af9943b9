import pytest
import torch

from tasks.build_model import Arch, build_model, count_params, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("arch", [
    Arch("mlp", 10, (1, 8, 8), hidden=(16, 16, 16)),
    Arch("cnn", 10, (1, 8, 8), conv=(4, 8, 16, 32), hidden=(8,)),  # deeper than the map can pool
])
def test_forward_shapes(arch):
    assert build_model(arch)(torch.zeros(3, *arch.input_shape)).shape == (3, 10)


def test_from_params_and_scaled():
    cnn = Arch.from_params({"family": "cnn", "depth": 3, "width": 64, "channels": 8, "activation": "gelu",
                            "dropout": 0.2, "kernel": 5}, 10, (1, 8, 8))
    assert cnn.conv == (8, 16, 32) and cnn.hidden == (64,) and cnn.kernel == 5
    model = build_model(cnn)
    assert any(isinstance(m, torch.nn.GELU) for m in model) and any(isinstance(m, torch.nn.Dropout) for m in model)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    small = cnn.scaled(0.5, depth=2)
    assert small.conv == (4, 8) and small.hidden == (32,)
    assert count_params(build_model(small)) < count_params(build_model(cnn)) / 3
    assert small.activation == "gelu" and small.kernel == 5
    mlp = Arch.from_params({"family": "mlp", "depth": 2, "width": 40, "channels": 8}, 10, (1, 8, 8))
    assert mlp.conv == () and mlp.scaled(0.5, depth=3).hidden == (20, 20, 20)


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
