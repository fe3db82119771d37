"""The service config: defaults that load, and a clear stop on anything unknown or mistyped."""

from __future__ import annotations

import pytest

from cloud_trainer.config import ServiceConfig, example, load_config
from cloud_trainer.errors import ConfigError


def test_the_printed_defaults_load_back_as_the_defaults(tmp_path):
    path = tmp_path / "cloud.toml"
    path.write_text(example())

    assert load_config(path) == ServiceConfig()


def test_values_are_read_by_section(tmp_path):
    path = tmp_path / "cloud.toml"
    path.write_text(
        'worker = "w2"\n[aggregation]\nstrategy = "median"\nquorum = 3\ndeadline = 30\n'
        "[rollout]\nwaves = [0.5, 1]\n"
    )

    config = load_config(path)

    assert config.worker == "w2"
    assert (config.aggregation.strategy, config.aggregation.quorum) == ("median", 3)
    assert config.aggregation.deadline == 30.0 and config.rollout.waves == [0.5, 1.0]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[aggregation]\nquorom = 3\n", "aggregation.quorom: unknown key"),
        ('[aggregation]\nquorum = "3"\n', "aggregation.quorum: expected int, got str"),
        ("[aggregation]\nquorum = true\n", "aggregation.quorum: expected int, got bool"),
        ('[rollout]\nwaves = [0.5, "all"]\n', "rollout.waves[1]: expected float, got str"),
        ('[brokers]\nurl = "x"\n', "brokers: unknown key"),
        ("broker = 3\n", "broker: expected a [broker] table"),
        ('[aggregation]\nstrategy = "mode"\n', "aggregation.strategy: unknown 'mode'"),
        ("[aggregation\n", "cloud.toml"),
    ],
)
def test_a_bad_config_names_what_is_wrong(tmp_path, text, named):
    path = tmp_path / "cloud.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert named in str(info.value)
