import pytest

from sst_merge.errors import ConfigError
from sst_merge.experiments.config import SST_DEFAULTS, ExperimentConfig, resolve_config


def test_minimal_preset_then_overrides():
    cfg = resolve_config("minimal", {"model": "x"}, ["eval.refusal_limit=7", "sst.fisher=kfac", "sst.k=3"])
    assert cfg.mode == "minimal"
    assert cfg.eval.refusal_limit == 7  # override beats preset (40)
    assert cfg.eval.over_refusal_limit == 40  # preset value kept
    assert cfg.sst["fisher"] == "kfac"
    assert cfg.sst["k"] == 3 and "share" not in cfg.sst and "fraction" not in cfg.sst and "threshold" not in cfg.sst
    assert cfg.sst["n_samples"] == 16  # the minimal preset's value, merged over the defaults


def test_full_preset_differs_from_minimal():
    full, minimal = resolve_config("full"), resolve_config("minimal")
    assert full.eval.refusal_limit is None  # every held-out prompt
    assert minimal.eval.refusal_limit == 40
    assert full.eval.max_new_tokens >= 64  # design §6: ≥ 64 new tokens in full mode
    assert len(full.sweep.alphas) > len(minimal.sweep.alphas)


def test_default_selection_is_a_share_of_the_ranked_directions():
    assert ExperimentConfig().sst["share"] == SST_DEFAULTS["share"] and "fraction" not in ExperimentConfig().sst


def test_two_selections_refused():
    with pytest.raises(ConfigError, match="sst"):
        resolve_config("minimal", {"sst": {"k": 4, "fraction": 0.5}})


def test_unknown_sst_parameter_refused():
    with pytest.raises(ConfigError, match="alhpa"):
        resolve_config("minimal", None, ["sst.alhpa=0.5"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"eval\.refusal_limt: unknown key"):
        resolve_config("minimal", None, ["eval.refusal_limt=3"])


def test_mode_in_yaml_switches_preset():
    cfg = resolve_config("minimal", {"mode": "full"})
    assert cfg.mode == "full" and cfg.eval.refusal_limit is None


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_map_accepts_devices(value):
    assert resolve_config("minimal", overrides=[f"device_map={value}"]).device_map == value


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "auto2"])
def test_device_map_typo_refused_in_config_and_cli(value, capsys):
    with pytest.raises(ConfigError, match="device_map"):
        resolve_config("minimal", overrides=[f"device_map={value}"])
    from sst_merge.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--tasks", "refusal", "--device-map", value, "-o", "x.json"])
    assert "not a device map; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
