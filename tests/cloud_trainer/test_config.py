"""The service config: defaults that load, and a clear stop on anything unknown or mistyped."""

from __future__ import annotations

import pytest

from cloud_trainer.errors import ConfigError
from cloud_trainer.service.config import ServiceConfig, example, load_config


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
        ('[aggregation]\nstrategy = "krum"\nmalicious = 0.5\n', "aggregation: malicious"),
        ("[aggregation]\ncap = 0.5\n", "aggregation: cap"),
        ("[fleet]\nreselect_gain = -0.5\n", "fleet.reselect_gain: must be >= 0"),
        ("[fleet]\nreselect_gain = nan\n", "fleet.reselect_gain: expected a number"),
        ("[integration]\nmin_updates = -1\n", "integration.min_updates: must be >= 0"),
        ('[aggregation]\ncarry = "yes"\n', "aggregation.carry: expected bool, got str"),
    ],
)
def test_a_bad_config_names_what_is_wrong(tmp_path, text, named):
    path = tmp_path / "cloud.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert named in str(info.value)


def test_krum_and_multi_krum_are_chosen_in_the_config_with_their_parameters(tmp_path):
    from cloud_trainer.federation.strategies import Krum, MultiKrum, TrimmedMean

    path = tmp_path / "cloud.toml"
    path.write_text('[aggregation]\nstrategy = "multi-krum"\nmalicious = 0.3\nkeep = 0.5\n')
    multi = load_config(path).aggregation.make_strategy()
    path.write_text('[aggregation]\nstrategy = "krum"\ncap = 0\n')
    krum = load_config(path).aggregation.make_strategy()

    assert multi == MultiKrum(malicious=0.3, keep=0.5, cap=1.0)
    assert krum == Krum(malicious=0.2, cap=0.0)
    assert ServiceConfig().aggregation.make_strategy() == TrimmedMean(trim=0.2, cap=1.0)
