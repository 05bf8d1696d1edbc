"""Presets are data, loaded into typed configs; overrides are checked against the types."""

import json

import pytest

from moe_recipes import config
from moe_recipes.recipes import mthl


@pytest.mark.parametrize("preset", config.preset_names("mthl"))
def test_every_mthl_preset_loads(preset):
    cfg = config.load(mthl.MTHLConfig, "mthl", preset)
    assert cfg.preset == preset and cfg.recipe == "mthl"
    assert [s.weight for s in cfg.sources] == [3.0, 2.0, 1.0]  # the paper's sampling weights
    assert [s.loss_weight for s in cfg.sources] == [1.0, 0.6, 0.2]  # and loss weights
    assert cfg.model.num_experts == 12 and cfg.model.k == 4 and cfg.optim.name == "lamb"
    assert cfg.optim.clip_grad == 0.1 and cfg.schedule.kind == "triangular"


def test_presets_exist():
    assert {"cpu-tiny", "cpu-small", "paper"} <= set(config.preset_names("mthl"))


def test_overrides_are_typed():
    cfg = config.load(mthl.MTHLConfig, "mthl", "cpu-tiny",
                      ["train.steps=7", "optim.lr=1e-3", "model.depths=[1,1,1,1]", "optim.name=sgd",
                       "sources.1.batch_size=3", "downstream.lr_cls=[0.1, 0.01]", "train.progress=false"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.model.depths == [1, 1, 1, 1]
    assert cfg.optim.name == "sgd" and cfg.sources[1].batch_size == 3 and cfg.downstream.lr_cls == [0.1, 0.01]
    assert cfg.train.progress is False
    assert config.load(mthl.MTHLConfig, "mthl", "cpu-tiny", ["optim.lr=1"]).optim.lr == 1.0  # int -> float


@pytest.mark.parametrize("override, match", [
    ("train.stepz=3", r"unknown key\(s\) \['stepz'\] in section 'train'"),
    ("train.steps=3.5", "key 'train.steps' must be int"),
    ("train.steps", "must be key=value"),
    ("sources.9.batch_size=1", "not an index of a list of 3"),
    ("train.steps.x=1", "'train.steps' is a value"),
    ("model.depths=4", "key 'model.depths' must be a list"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load(mthl.MTHLConfig, "mthl", "cpu-tiny", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(config.ConfigError, match="no preset 'nope'.*cpu-tiny"):
        config.load(mthl.MTHLConfig, "mthl", "nope")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(mthl.MTHLConfig, "mthl", "cpu-tiny", ["train.steps=5"])
    p = tmp_path / "config.json"
    p.write_text(json.dumps(config.to_dict(cfg)))
    again = config.load(mthl.MTHLConfig, "mthl", str(p))
    assert again == cfg


def test_command_line_lists_presets_and_names_bad_keys(capsys, tmp_path):
    from moe_kernels.cli import main

    assert main(["pretrain", "mthl", "--list-presets"]) == 0
    assert "cpu-tiny" in capsys.readouterr().out.split()
    assert main(["pretrain", "mthl", "--out", str(tmp_path / "x"), "train.stepz=3"]) == 2
    assert "unknown key(s) ['stepz'] in section 'train'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a bad config
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    assert main(["pretrain", "mthl", "--out", str(tmp_path / "keep"), "--fresh"]) == 2  # not a run folder
    assert (tmp_path / "keep" / "precious.txt").exists()
