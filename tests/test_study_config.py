"""The study TOML: federation options, server optimiser settings, clear errors for mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.federation.strategies import FedAdam
from fedseg.federation.study import FederationConfig, load_study_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_fedadam_options_come_from_the_toml(tmp_path):
    config = load_study_config(write(tmp_path, """
[federation]
server_optimizer = "fedadam"
server_optimizer_options = { eta = 0.05, beta1 = 0.5 }
evaluate = false
"""))
    aggregator = config.federation.make_aggregator()
    assert isinstance(aggregator, FedAdam)
    assert aggregator.options.eta == 0.05 and aggregator.options.beta1 == 0.5 and aggregator.options.tau == 1e-3
    assert config.federation.evaluate is False
    # the record a run keeps round-trips
    assert FederationConfig.from_dict(config.federation.to_dict()) == config.federation


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('server_optimizer_options = { eta = 0.1 }', "server_optimizer_options is set but federation.server_optimizer is not"),
        ('server_optimizer = "fedadam"\nserver_optimizer_options = { lr = 0.1 }', "unknown option(s) lr"),
        ('server_optimizer = "fedadam"\nserver_optimizer_options = { eta = -1.0 }', "eta must be a number > 0"),
        ('evaluate = "yes"', "federation.evaluate must be true or false"),
        ('aggregator = "median"', "unknown 'median'"),
    ],
)
def test_bad_federation_settings_are_named(tmp_path, text, message):
    with pytest.raises(FedsegError) as info:
        load_study_config(write(tmp_path, f"[federation]\n{text}\n"))
    assert message in str(info.value)
