"""The study TOML: federation options, server optimiser settings, clear errors for mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.federation.strategies import FedAdam
from fedseg.federation.config import FederationConfig, load_study_config


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
        ('aggregator = "krum"', "unknown 'krum'"),
    ],
)
def test_bad_federation_settings_are_named(tmp_path, text, message):
    with pytest.raises(FedsegError) as info:
        load_study_config(write(tmp_path, f"[federation]\n{text}\n"))
    assert message in str(info.value)


def test_a_study_config_written_as_toml_reads_back_identical(tmp_path):
    from fedseg.data.preprocess import PrepareConfig
    from fedseg.federation.config import StudyConfig
    from fedseg.training.config import TrainConfig

    study = StudyConfig(
        FederationConfig(rounds=7, min_sites=2, server_optimizer="fedadam", server_optimizer_options={"eta": 0.05}, evaluate=False),
        TrainConfig(network="unet", epochs=3, patch_size=(32, 32, 16), learning_rate=4e-3, threads=1),
        PrepareConfig(spacing_mm=3.0),
    )
    assert load_study_config(write(tmp_path, study.to_toml())) == study
    default = load_study_config(write(tmp_path, StudyConfig().to_toml()))
    assert default.train.to_dict() == StudyConfig().train.to_dict()  # the default patch is written out explicitly
    assert (default.federation, default.prepare) == (StudyConfig().federation, StudyConfig().prepare)


def test_local_epochs_per_round(tmp_path):
    assert load_study_config(write(tmp_path, "[federation]\nlocal_epochs = 3\n")).federation.local_epochs == 3
    with pytest.raises(FedsegError, match="local_epochs must be an integer >= 1"):
        load_study_config(write(tmp_path, "[federation]\nlocal_epochs = 0\n"))
