"""`modelforge init`: the source, schema and classes inferred from the data, a complete commented
config that loads, and clear refusals."""

import shutil

import pytest

from flows.cli import main
from tasks.config import load_config
from tasks.core.settings import ConfigError
from tasks.data import DataError
from tasks.examples import docstring_topics, wine
from tasks.init_config import init_config


def test_a_table_gets_a_table_config_with_every_key_documented(tmp_path):
    wine(tmp_path / "datasets" / "wine")
    out = init_config(tmp_path / "datasets/wine/data.csv", "label", None, "configs/wine.yaml", tmp_path)
    cfg = load_config(out)
    assert cfg.data.dataset == "table" and cfg.data.label == "label" and cfg.data.file == "data.csv"
    assert str(cfg.data.dir) == "datasets/wine" and cfg.search.space.families == ["mlp"]
    text = out.read_text()
    assert "178 rows, 14 feature columns, 3 classes" in text and "site (categorical, 0 missing)" in text
    assert "# Fewest train rows a class may have." in text  # field docs ride along as comments
    assert cfg.register_.model_name == "wine-classifier"


def png_classes(folder, n: int = 24, size: int = 8) -> None:
    """Two class folders of small grey PNGs, dark and bright: data a model can learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, level in (("cat", 40), ("dog", 200)):
        (folder / label).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(level, 30, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")


def user_module(root, name: str = "acme_nets") -> str:
    """A user's own module in their project folder: flattens any input, one linear layer."""
    (root / f"{name}.py").write_text(
        "import math\nfrom torch import nn\n\n"
        "def linear(num_classes, input_shape):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))\n"
    )
    return f"{name}:linear"


def test_texts_and_image_folders_are_recognised(tmp_path):
    docstring_topics(tmp_path / "texts", classes=2, per_class=40)
    cfg = load_config(init_config(tmp_path / "texts/data.csv", "label", None, "text.yaml", tmp_path))
    assert cfg.data.dataset == "text" and cfg.data.text == "text" and cfg.search.space.families == ["text"]
    cfg = load_config(
        init_config(tmp_path / "texts/data.csv", "label", "minilm", "tuned.yaml", tmp_path)
    )  # transfer learning
    assert (cfg.model.pretrained, cfg.data.tokenizer, cfg.search.space.families) == ("minilm", "minilm", ["hf"])
    images = tmp_path / "images"
    png_classes(images)
    cfg = load_config(init_config(images, None, "cnn", "img.yaml", tmp_path))
    assert cfg.data.dataset == "image_folder" and cfg.search.space.families == ["cnn"]
    assert cfg.search.space.augment == ["shift"]
    spec = user_module(tmp_path)
    text = init_config(images, None, spec, "own.yaml", tmp_path).read_text()
    cfg = load_config(tmp_path / "own.yaml")  # a user's module: its training is searched, not an architecture
    assert cfg.model.spec == spec and cfg.search.space.families == ["custom"]
    assert f"spec: {spec}  # 'package.module:function'" in text and "\n  model:" not in text
    # a module has no narrower twin to distil into: no student candidate that would fail after training
    assert "student" not in cfg.compress.candidates and "pruned" in cfg.compress.candidates
    from user_models import tiny_vit

    tiny_vit(tmp_path / "vit", image_size=16, channels=3)  # a local HF image classifier sets the image input
    cfg = load_config(init_config(images, None, "vit", "vit.yaml", tmp_path))
    assert cfg.model.pretrained == str(tmp_path / "vit") and cfg.search.space.families == ["hf"]
    assert (cfg.data.image_size, cfg.data.color) == ((16, 16), "rgb")
    assert "student" in cfg.compress.candidates  # a Hugging Face teacher distils into its shallower twin
    # each model ships to bundle folders of its own
    assert (str(cfg.register_.bundle_dir), str(cfg.promote.champion_bundle_dir)) == (
        "deploy/vit-bundle",
        "deploy/vit-champion",
    )


def test_init_refuses_what_run_would_refuse(tmp_path):
    """Every check `run` makes before training runs at init: a config init writes is one run takes."""
    wine(tmp_path / "d")
    (tmp_path / "d/data.csv").rename(tmp_path / "cancer.csv")  # a table at the project root
    with pytest.raises(ConfigError, match=r"folder of its own inside the project .*mkdir -p data/cancer && cp "):
        init_config(tmp_path / "cancer.csv", "label", None, "c.yaml", tmp_path)
    elsewhere = tmp_path / "elsewhere"
    wine(elsewhere)
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(ConfigError, match="folder of its own inside the project"):
        init_config(elsewhere / "data.csv", "label", None, "c.yaml", project)
    (elsewhere / "notes.txt").write_text("not data")  # a stray file the table source refuses at versioning
    shutil.copytree(elsewhere, project / "data")
    with pytest.raises(DataError, match=r"notes\.txt"):
        init_config(project / "data/data.csv", "label", None, "c.yaml", project)
    (project / "data/notes.txt").unlink()
    with pytest.raises(ConfigError, match=r"cannot import 'acme\.nets'"):  # the model is checked on the data's shapes
        init_config(project / "data/data.csv", "label", "acme.nets:make_net", "c.yaml", project)
    assert not (project / "c.yaml").exists()  # nothing written when refused


def test_a_hand_written_distillation_without_a_student_is_refused_at_load(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {spec: 'acme_nets:linear'}\n")  # the default candidates distil
    with pytest.raises(ConfigError, match="distill has no student for a custom teacher"):
        load_config(config)


def test_refusals_are_clear(tmp_path, capsys):
    wine(tmp_path / "d")
    with pytest.raises(DataError, match="name its class column with --label"):
        init_config(tmp_path / "d/data.csv", None, None, "c.yaml", tmp_path)
    with pytest.raises(DataError, match="no column 'target'"):
        init_config(tmp_path / "d/data.csv", "target", None, "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match="known model families"):
        init_config(tmp_path / "d/data.csv", "label", "transformer", "c.yaml", tmp_path)
    with pytest.raises(
        ConfigError, match=r"--model minilm is a pretrained Hugging Face model \(texts or images\); .* is table data"
    ):
        init_config(tmp_path / "d/data.csv", "label", "minilm", "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"--model resnet takes images; .* is table data"):
        init_config(tmp_path / "d/data.csv", "label", "resnet", "c.yaml", tmp_path)
    init_config(tmp_path / "d/data.csv", "label", None, "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match="never overwrites"):
        init_config(tmp_path / "d/data.csv", "label", None, "c.yaml", tmp_path)
    # the CLI reports the same in one line with exit code 2
    assert main(["init", "--root", str(tmp_path), "--data", "d/data.csv", "--out", "c2.yaml"]) == 2
    assert "name its class column with --label" in capsys.readouterr().err
