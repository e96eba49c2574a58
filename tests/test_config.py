"""config.yaml validation: bad values are rejected in one line naming the key."""

from __future__ import annotations

import pytest

from mycelium.config import DEFAULT_CONFIG_PATH, load_config
from mycelium.store import artifact_digest
from mycelium.errors import ConfigError


def test_shipped_config_is_valid_and_holds_the_seed_numbers():
    cfg = load_config()
    assert cfg.heartbeat.iaf_threshold == 0.5
    assert cfg.heartbeat.min_run_length == 5
    assert cfg.ib.elbow_gain_threshold == 0.15
    assert cfg.c2.threshold == 0.3 and len(cfg.c2.labels) == cfg.c2.num_labels == 15
    assert cfg.c4.domain_constants["minutes_per_hour"] == 60
    assert cfg.eval.beam_width == 10


@pytest.mark.parametrize(
    "override, expected",
    [
        ("heartbeat.iaf_threshold=3", "heartbeat.iaf_threshold: must be less than or equal to 1"),
        ("extraction.chunk_size=0", "extraction.chunk_size: must be greater than or equal to 1"),
        ("extraction.chunk_size=lots", "extraction.chunk_size: must be a valid integer"),
        ("extraction.mode=dream", "extraction.mode: must be 'teacher_forced' or 'generate'"),
        ("extraction.computing_heads=[L1X2]", "extraction.computing_heads: heads must look like L22H4"),
        ("heartbeat.jsd_smoothing_window=4", "jsd_smoothing_window must be odd"),
        ("heartbeat.colour=red", "heartbeat.colour: unknown key"),
        ("teacher.temperature=0.7", "teacher.temperature: must be less than or equal to 0"),
        ("no_dot=1", "expected section.key=value"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_key_in_file_is_rejected(tmp_path):
    text = DEFAULT_CONFIG_PATH.read_text().replace("  min_run_length: 5", "  min_run_length: 5\n  min_run_lenght: 6")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="heartbeat.min_run_lenght: unknown key"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_smoke_applies_its_section_and_set_still_wins():
    smoke = load_config(smoke=True)
    assert smoke.dataset.source == "embedded:sample"
    assert smoke.dataset.limit == 8
    assert load_config(smoke=True, overrides=["dataset.limit=3"]).dataset.limit == 3


def test_artifact_keys_follow_section_values():
    def key(section):
        return artifact_digest("heartbeats", section.digest_payload(), [], "code")

    a = load_config().heartbeat
    b = load_config(overrides=["heartbeat.iaf_threshold=0.4"]).heartbeat
    assert key(a) == key(load_config().heartbeat)
    assert key(a) != key(b)
