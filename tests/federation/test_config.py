"""The study TOML's tables as typed, frozen configs: every mistake named with its file, table, key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.data.preprocess import PrepareConfig
from fedseg.errors import FedsegError
from fedseg.federation.config import FederationConfig, StudyConfig, load_study_config
from fedseg.study.profiles import load_settings
from fedseg.training.config import TrainConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nlr_patience = -1\n", "train.lr_patience must be an integer >= 0, got -1"),
        ("[train]\nepoch = 3\n", "unknown option(s) in the train table ['epoch']; [train] takes network, epochs,"),
        ("[train]\nepochs = 2.5\n", "train.epochs must be an integer >= 1, got 2.5"),
        ('[train]\namp = "yes"\n', "train.amp must be true or false, got 'yes'"),
        ("[train.augment]\nnoise_prob = 1.5\n", "train.augment.noise_prob must be a number between 0 and 1, got 1.5"),
        ("[federation]\nrounds = 0\n", "federation.rounds must be an integer >= 1, got 0"),
        ("[federation]\ngrace_s = -1\n", "federation.grace_s must be a positive number of seconds, got -1"),
        ("[prepare]\nimage_order = 4\n", "prepare.image_order must be 1 (linear), 2 or 3 (cubic), got 4"),
        ("[traning]\nepochs = 3\n", "unknown table(s) ['traning']; known: federation, train, prepare"),
        ("train = 3\n", "train must be a table, got 3"),
    ],
)
def test_mistakes_name_the_file_the_table_and_the_key(tmp_path, text, message):
    with pytest.raises(FedsegError) as info:
        load_study_config(write(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 'study.toml'}: ")
    assert message in str(info.value)


def test_the_study_profile_file_takes_the_study_table_too(tmp_path):
    assert load_settings("demo", write(tmp_path, "[study]\nworkers = 3\n")).plan.workers == 3
    with pytest.raises(FedsegError, match=r"study.toml: unknown table\(s\) \['stdy'\]; known: study, federation, train, prepare"):
        load_settings("demo", write(tmp_path, "[stdy]\nworkers = 3\n"))
    with pytest.raises(FedsegError, match=r"study.toml: study.cases must be an integer >= 3 \(a site needs a test case and two folds\), got 2"):
        load_settings("demo", write(tmp_path, "[study]\ncases = 2\n"))


def test_configs_are_frozen_compare_by_value_and_replace_validates():
    study = StudyConfig(FederationConfig(rounds=3), TrainConfig(epochs=2), PrepareConfig(spacing_mm=2.0))
    assert study == StudyConfig(federation=FederationConfig(rounds=3), train=TrainConfig(epochs=2), prepare=PrepareConfig(spacing_mm=2.0))
    assert study.replace(train=study.train.replace(epochs=5)).train.epochs == 5 and study.train.epochs == 2
    with pytest.raises(FedsegError, match="train.epochs must be an integer >= 1, got 0"):
        study.train.replace(epochs=0)
    with pytest.raises(ValueError, match="frozen"):
        study.train.epochs = 5  # type: ignore[misc]
    assert hash(TrainConfig(patch_size=(32, 32, 16))) == hash(TrainConfig(patch_size=[32, 32, 16]))


def test_the_written_toml_reads_back_and_leaves_unset_options_out(tmp_path):
    study = StudyConfig(FederationConfig(server_optimizer="fedadam", server_optimizer_options={"eta": 0.05}))
    text = study.to_toml()
    assert "min_sites" not in text and "threads" not in text  # unset: the default applies
    assert load_study_config(write(tmp_path, text)).federation == study.federation
