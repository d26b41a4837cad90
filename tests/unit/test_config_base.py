from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_fipo.config_base import ConfigError, from_dict, load_config, save_config


@dataclass
class Inner:
    size: int = 2
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    path: Optional[str] = None


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: run\ninner:\n  size: 4\n  tags: [p, q]\n")
    cfg = load_config(Outer, cfg_file, ["inner.rate=3", "flag=true", "inner.mode=b", "inner.path=/tmp/x"])
    assert cfg == Outer(name="run", flag=True, inner=Inner(size=4, rate=3.0, mode="b", tags=["p", "q"], path="/tmp/x"))
    assert isinstance(cfg.inner.rate, float)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("data,message", [
    ({"inner": {"sise": 3}}, r"unknown key inner\.sise in Inner; valid keys: mode, path, rate, size, tags"),
    ({"inner": {"size": "big"}}, r"inner\.size: expected int, got 'big'"),
    ({"inner": {"size": 2.5}}, r"inner\.size: expected int"),
    ({"flag": "yes"}, r"flag: expected bool"),
    ({"inner": {"mode": "c"}}, r"inner\.mode: expected one of 'a' \| 'b'"),
    ({"inner": {"tags": "p"}}, r"inner\.tags: expected a list"),
    ({"inner": 3}, r"inner: expected a mapping for Inner"),
])
def test_errors_name_the_key_and_type(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Outer, None, ["inner.size"])


def test_on_off_literals_survive_yaml_booleans(tmp_path):
    # YAML 1.1 reads `packing: off` (and the override actor.packing=on) as a boolean.
    from megatron_fipo.config import RunConfig

    path = tmp_path / "c.yaml"
    path.write_text("actor:\n  packing: off\n")
    assert load_config(RunConfig, path, []).actor.packing == "off"
    assert load_config(RunConfig, path, ["actor.packing=on"]).actor.packing == "on"


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-6 as the string '1e-6'; a float field takes it, a word stays an error.
    from megatron_fipo.config import RunConfig

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  adam_eps: 1e-6\n")
    assert load_config(RunConfig, path, []).optim.adam_eps == 1e-6
    assert load_config(RunConfig, path, ["optim.lr=3e-7"]).optim.lr == 3e-7
    with pytest.raises(ConfigError, match="optim.lr: expected float, got 'fast'"):
        load_config(RunConfig, path, ["optim.lr=fast"])
