from typing import Literal

import pytest
from pydantic import Field, field_validator

from sd2_ray.config import StageConfig, parse_override
from sd2_ray.errors import ConfigError


class Sampling(StageConfig):
    temperature: float = Field(0.0, ge=0.0)


class DemoConfig(StageConfig):
    model: str
    sparsity: float = 0.5
    mode: Literal["generate", "rewrite"] = "generate"
    sampling: Sampling = Sampling()

    @field_validator("sparsity")
    @classmethod
    def _in_open_unit(cls, v):
        if not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v


def test_overrides_beat_file_and_reach_nested(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: a\nsparsity: 0.6\nsampling: {temperature: 0.2}\n")
    cfg = DemoConfig.load(str(cfg_file), {"sparsity": 0.7, "sampling.temperature": 0.9})
    assert (cfg.model, cfg.sparsity, cfg.sampling.temperature) == ("a", 0.7, 0.9)


def test_section_of_pipeline_yaml(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("demo:\n  model: m\n")
    assert DemoConfig.load(str(cfg_file), section="demo").model == "m"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: a\nsparsty: 0.5\n", "field 'sparsty': unknown field"),
        ("model: a\nsparsity: 1.5\n", "field 'sparsity': must be in (0, 1)"),
        ("model: a\nmode: other\n", "field 'mode'"),
        ("sparsity: 0.5\n", "field 'model': Field required"),
        ("model: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model: a\nsampling: {temperature: -1}\n", "field 'sampling.temperature'"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, text, expected):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError) as err:
        DemoConfig.load(str(cfg_file))
    message = str(err.value)
    assert expected in message and "\n" not in message and str(cfg_file) in message


def test_missing_config_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        DemoConfig.load(str(tmp_path / "nope.yaml"))


def test_roundtrip_yaml_and_save(tmp_path):
    cfg = DemoConfig(model="x", sparsity=0.25)
    path = cfg.save(str(tmp_path / "out"))
    assert DemoConfig.load(path) == cfg


def test_parse_override_types():
    key, value = parse_override("lr=1e-4")  # YAML 1.1 reads 1e-4 as a string; pydantic coerces it
    assert key == "lr" and DemoConfig(model="m", sparsity=value).sparsity == 1e-4
    assert parse_override("num-workers=2") == ("num_workers", 2)
    assert parse_override("layers=[1,2]") == ("layers", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")
