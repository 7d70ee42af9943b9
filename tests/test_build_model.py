import pytest
import torch

from tasks.build_model import Arch, build_model, count_params, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("arch", [
    Arch("mlp", 10, (1, 8, 8), hidden=(16, 16, 16)),
    Arch("cnn", 10, (1, 8, 8), conv=(4, 8, 16, 32), hidden=(8,)),  # deeper than the map can pool
])
def test_forward_shapes(arch):
    assert build_model(arch)(torch.zeros(3, *arch.input_shape)).shape == (3, 10)


def test_from_search_and_scaled():
    cnn = Arch.from_search("cnn", depth=3, width=64, channels=8, num_classes=10, input_shape=(1, 8, 8))
    assert cnn.conv == (8, 16, 32) and cnn.hidden == (64,)
    small = cnn.scaled(0.5, depth=2)
    assert small.conv == (4, 8) and small.hidden == (32,)
    assert count_params(build_model(small)) < count_params(build_model(cnn)) / 3
    mlp = Arch.from_search("mlp", depth=2, width=40, channels=8, num_classes=10, input_shape=(1, 8, 8))
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
