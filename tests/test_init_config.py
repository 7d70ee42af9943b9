"""`modelforge init`: the source, schema and classes inferred from the data, a complete commented
config that loads, and clear refusals."""

import pandas as pd
import pytest

from flows.cli import main
from tasks.config import ConfigError, load_config
from tasks.data import DataError
from tasks.data.examples import wine
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


def test_texts_and_image_folders_are_recognised(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    pd.DataFrame({"body": ["the quick brown fox jumps", "a slow green turtle walks far"] * 5,
                  "topic": ["a", "b"] * 5}).to_csv(data / "t.csv", index=False)
    cfg = load_config(init_config(data / "t.csv", "topic", None, "text.yaml", tmp_path))
    assert cfg.data.dataset == "text" and cfg.data.text == "body" and cfg.search.space.families == ["text"]
    cfg = load_config(init_config(data / "t.csv", "topic", "minilm", "tuned.yaml", tmp_path))  # transfer learning
    assert (cfg.model.pretrained, cfg.data.tokenizer, cfg.search.space.families) == ("minilm", "minilm", ["hf"])
    images = tmp_path / "images"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
        (images / label / "1.png").write_bytes(b"")
    cfg = load_config(init_config(images, None, "cnn", "img.yaml", tmp_path))
    assert cfg.data.dataset == "image_folder" and cfg.search.space.families == ["cnn"]
    assert cfg.search.space.augment == ["shift"]
    text = init_config(images, None, "acme.nets:make_net", "own.yaml", tmp_path).read_text()
    cfg = load_config(tmp_path / "own.yaml")  # a user's module: its training is searched, not an architecture
    assert cfg.model.spec == "acme.nets:make_net" and cfg.search.space.families == ["custom"]
    assert "spec: acme.nets:make_net  # 'package.module:function'" in text and "\n  model:" not in text
    from user_models import tiny_vit

    tiny_vit(tmp_path / "vit", image_size=16, channels=3)  # a local HF image classifier sets the image input
    cfg = load_config(init_config(images, None, "vit", "vit.yaml", tmp_path))
    assert cfg.model.pretrained == str(tmp_path / "vit") and cfg.search.space.families == ["hf"]
    assert (cfg.data.image_size, cfg.data.color) == ((16, 16), "rgb")


def test_refusals_are_clear(tmp_path, capsys):
    wine(tmp_path / "d")
    with pytest.raises(DataError, match="name its class column with --label"):
        init_config(tmp_path / "d/data.csv", None, None, "c.yaml", tmp_path)
    with pytest.raises(DataError, match="no column 'target'"):
        init_config(tmp_path / "d/data.csv", "target", None, "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match="known model families"):
        init_config(tmp_path / "d/data.csv", "label", "transformer", "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"--model minilm is a pretrained Hugging Face model \(texts or images\); .* is table data"):
        init_config(tmp_path / "d/data.csv", "label", "minilm", "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match="--model resnet takes images; .* is table data"):
        init_config(tmp_path / "d/data.csv", "label", "resnet", "c.yaml", tmp_path)
    init_config(tmp_path / "d/data.csv", "label", None, "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match="never overwrites"):
        init_config(tmp_path / "d/data.csv", "label", None, "c.yaml", tmp_path)
    # the CLI reports the same in one line with exit code 2
    assert main(["init", "--root", str(tmp_path), "--data", "d/data.csv", "--out", "c2.yaml"]) == 2
    assert "name its class column with --label" in capsys.readouterr().err
