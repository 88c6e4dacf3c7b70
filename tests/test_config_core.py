"""Config machinery: merge order, validation before compute, suggestions, type coercion."""
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import pytest

from fdistill.config import ConfigError, build_config, diff_configs, parse_overrides, save_yaml, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Cfg:
    optim: Optim = field(default_factory=Optim)
    epochs: int = 10
    seed: Optional[int] = None
    amp: bool = True


def test_defaults_file_overrides_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("epochs: 5\noptim:\n  lr: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\noptim:\n  name: sgd\n")
    cfg = build_config(Cfg, child, ["optim.lr=1e-2", "seed=3"])
    assert cfg.epochs == 5 and cfg.optim.name == "sgd" and cfg.optim.lr == 0.01 and cfg.seed == 3
    assert cfg.optim.betas == [0.9, 0.999] and cfg.amp is True


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        build_config(Cfg, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        build_config(Cfg, None, ["epoch=1"])


def test_wrong_types_rejected():
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        build_config(Cfg, None, ["epochs=ten"])
    with pytest.raises(ConfigError, match="amp: expected true/false"):
        build_config(Cfg, None, {"amp": "yes please"})
    with pytest.raises(ConfigError, match="not one of"):
        build_config(Cfg, None, ["optim.name=adam"])
    # YAML 1.1 reads 1e-3 as a string: numeric strings are accepted for float fields
    assert build_config(Cfg, None, {"optim": {"lr": "1e-3"}}).optim.lr == 1e-3


def test_roundtrip_and_diff(tmp_path):
    cfg = build_config(Cfg, None, ["optim.lr=0.5"])
    save_yaml(cfg, tmp_path / "c.yaml")
    again = build_config(Cfg, tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert diff_configs(to_dict(cfg), to_dict(Cfg())) == ["optim.lr: 0.5 != 0.001"]


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(Cfg, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.base_lr=nan", "optim.weight_decay=-.inf",
                                      "distill.mask_ratio=.nan", "student.drop_path_rate=inf", "optim.betas=[0.9, .nan]"])
def test_non_finite_numbers_are_refused_before_any_compute(override):
    """``optim.lr=.inf`` used to pass every ``> 0`` check and end in a run of non-finite weights."""
    from fdistill.config.distill import DistillConfig

    with pytest.raises(ConfigError, match="finite"):
        build_config(DistillConfig, "configs/distill/tiny_cpu.yaml", [override])


def test_non_finite_numbers_are_refused_in_every_schema():
    from fdistill.config.finetune import FinetuneConfig, LinprobeConfig

    with pytest.raises(ConfigError, match="optim.base_lr: must be a finite number"):
        build_config(FinetuneConfig, None, ["optim.base_lr=.inf"])
    with pytest.raises(ConfigError, match="finite"):
        build_config(LinprobeConfig, None, ["weight_decay=nan"])
