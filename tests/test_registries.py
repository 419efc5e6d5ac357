"""Registries decide what config accepts: every registered name loads, anything else fails naming the key and
the registered names; losses take arguments as `{name, args}`."""
from __future__ import annotations

import pytest
import torch

from mmrank.config import VALIDATION_METRICS, ConfigError, load_config
from mmrank.registry import BACKENDS, CANDIDATE_SOURCES, ENCODERS, FUSIONS, HEADS, LOADERS, LOSSES, Registry

# (config key, registry, what the code registers today)
CHOICES = [
    ("train.loss", LOSSES, {"pointwise_bce", "pointwise_mse", "ranknet", "listnet", "lambdarank"}),
    ("train.fusion", FUSIONS, {"concat", "gated", "max_pool", "avg_pool", "weighted_sum"}),
    ("train.head", HEADS, {"mlp", "linear", "logistic"}),
    ("train.backend", BACKENDS, {"local", "horovod", "torch_distributor"}),
    ("train.data_loader", LOADERS, {"petastorm", "parquet"}),
    ("features.text.name", ENCODERS["text"], {"minilm", "bert", "hf"}),
    ("features.image.name", ENCODERS["image"], {"resnet18", "resnet50"}),
    ("features.audio.name", ENCODERS["audio"], {"logmel_cnn", "logmel_lstm"}),
]


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return getattr(node, "name", node)


@pytest.mark.parametrize("key, registry, expected", CHOICES, ids=[c[0] for c in CHOICES])
def test_config_accepts_exactly_the_registered_names(key, registry, expected):
    assert set(registry.names()) == expected
    for name in registry.names():
        assert _get(load_config(None, [f"{key}={name}"]), key) == name
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=not_registered"])
    assert key in str(e.value) and "'not_registered'" in str(e.value)
    assert ", ".join(sorted(expected)) in str(e.value)


def test_candidate_sources_are_a_registered_list_and_both_means_both():
    assert set(CANDIDATE_SOURCES.names()) == {"impressions", "similarity"}
    assert load_config().score.candidates == ["impressions", "similarity"]
    assert load_config(None, ["score.candidates=both"]).score.candidates == ["impressions", "similarity"]
    assert load_config(None, ["score.candidates=similarity"]).score.candidates == ["similarity"]
    for bad in ("score.candidates=[impressions, crawl]", "score.candidates=[]"):
        with pytest.raises(ConfigError, match="score.candidates"):
            load_config(None, [bad])


def test_a_new_registration_is_accepted_without_touching_config():
    @LOSSES.register("test_only_hinge")
    def hinge(scores, grades, margin: float = 1.0):
        return torch.relu(margin - scores).mean()

    try:
        cfg = load_config(None, ["train.loss={name: test_only_hinge, args: {margin: 0.5}}"])
        assert cfg.train.loss.name == "test_only_hinge" and cfg.train.loss.args == {"margin": 0.5}
    finally:
        LOSSES._items.pop("test_only_hinge")
    with pytest.raises(ConfigError):
        load_config(None, ["train.loss=test_only_hinge"])


def test_loss_args_are_checked_bound_and_keep_the_plain_name_form():
    from mmrank.ranker.losses import get_loss

    cfg = load_config(None, ["train.loss={name: ranknet, args: {sigma: 4.0}}"])
    scores, grades = torch.tensor([[0.3, 0.1, -0.2]]), torch.tensor([[2.0, 0.0, 1.0]])
    assert get_loss(cfg.train.loss)(scores, grades) != get_loss("ranknet")(scores, grades)
    assert get_loss(cfg.train.loss)(scores, grades) == LOSSES["ranknet"](scores, grades, sigma=4.0)
    assert cfg.model_dump(mode="json")["train"]["loss"] == {"name": "ranknet", "args": {"sigma": 4.0}}
    assert load_config().model_dump(mode="json")["train"]["loss"] == "lambdarank"
    with pytest.raises(ConfigError, match="takes no argument.*'temperature'"):
        load_config(None, ["train.loss={name: ranknet, args: {temperature: 2}}"])


def test_early_stopping_metric_comes_from_config():
    assert load_config().train.early_stopping_metric == "ndcg@10"
    for m in VALIDATION_METRICS:
        assert load_config(None, [f"train.early_stopping_metric={m}"]).train.early_stopping_metric == m
    with pytest.raises(ConfigError, match="train.early_stopping_metric"):
        load_config(None, ["train.early_stopping_metric=auc"])


def test_registry_errors_and_lookup():
    r: Registry = Registry("x.key")
    r.register("a", "b")(len)
    assert r.names() == ["a", "b"] and r["a"] is len and "b" in r and list(r) == ["a", "b"]
    with pytest.raises(ValueError, match="'c' is not registered for x.key; known: a, b"):
        r.get("c")
