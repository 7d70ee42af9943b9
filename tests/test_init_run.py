"""`init` then `run`, as a new user does it: for each data source, the config `init` writes is run
unchanged but for the trial count its header suggests overriding, and ships a model. Built-in
families, a user's own module and a local Hugging Face checkpoint each take one source here; every
other pairing is checked by `init`'s own pre-training checks (tests/test_init_config.py)."""

import json

import pytest
from test_init_config import png_classes, user_module

from tasks.examples import wine
from tasks.init_config import init_config


def _table_with_user_module(root):
    wine(root / "data" / "wine")
    return root / "data/wine/data.csv", "label", user_module(root)


def _images_with_hf_checkpoint(root):
    from user_models import tiny_vit

    png_classes(root / "data" / "pets")
    return root / "data/pets", None, str(tiny_vit(root / "vit", image_size=8, channels=1))


def _texts_with_builtin_family(root):
    """Two topics in words of their own: what any text model should learn in a few epochs."""
    import random

    import pandas as pd

    rng = random.Random(0)
    words = {
        "cooking": "oven flour sugar bake knead dough salt butter whisk pan".split(),
        "sailing": "boat wind sail mast keel harbour tide rope anchor deck".split(),
    }
    rows = [
        {"text": " ".join(rng.choices(vocab, k=8)), "label": topic} for topic, vocab in words.items() for _ in range(60)
    ]
    (root / "data" / "topics").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data/topics/data.csv", index=False)
    return root / "data/topics/data.csv", "label", None


@pytest.mark.e2e
@pytest.mark.parametrize(
    "project",
    [_table_with_user_module, _images_with_hf_checkpoint, _texts_with_builtin_family],
    ids=["table+module", "images+hf", "text+builtin"],
)
def test_what_init_writes_run_finishes(tmp_path, prefect_api, project):
    from flows.optimize import optimize

    data, label, model = project(tmp_path)
    config = init_config(data, label, model, "configs/mine.yaml", tmp_path)
    result = optimize(config_path=str(config), root=str(tmp_path), overrides=["search.n_trials=2"])
    manifest = json.loads((tmp_path / "deploy/mine-bundle/manifest.json").read_text())
    assert manifest["candidate"] == result["chosen"] and result["promoted"]
    assert (tmp_path / "deploy/mine-champion/manifest.json").is_file()
