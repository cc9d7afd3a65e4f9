"""Configuration: flags over environment over defaults, validated, secrets masked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from procqueue.config import ConfigError, default_status_file, processor_config, redact_dsn


def test_defaults_match_flagsmith():
    config = processor_config(env={})
    assert (config.num_workers, config.sleep_interval_ms, config.grace_period_ms, config.queue_pop_size) == (
        5, 2000, 20000, 10)
    assert config.database.url is None and config.database.schema == "procqueue"


def test_flagsmith_environment_variables_are_honoured_and_flags_win():
    env = {"TASK_PROCESSOR_NUM_THREADS": "3", "TASK_PROCESSOR_SLEEP_INTERVAL_MS": "500",
           "TASK_PROCESSOR_GRACE_PERIOD_MS": "9000", "TASK_PROCESSOR_QUEUE_POP_SIZE": "25",
           "DATABASE_URL": "postgresql://u@h/db", "PROCQUEUE_SCHEMA": "jobs", "PROCQUEUE_IMPORTS": "a.b, c"}
    config = processor_config(env=env)
    assert (config.num_workers, config.sleep_interval_ms, config.grace_period_ms, config.queue_pop_size) == (
        3, 500, 9000, 25)
    assert config.database.url == "postgresql://u@h/db" and config.database.schema == "jobs"
    assert config.imports == ("a.b", "c")
    assert processor_config(num_workers=7, env=env).num_workers == 7


@pytest.mark.parametrize("url, shown", [
    ("postgresql://app:s3cret@db.internal:5432/app", "host=db.internal port=5432 dbname=app user=app password=***"),
    ("postgresql://app@db/app", "host=db dbname=app user=app"),
    ("postgresql://db/app?user=app&password=s3cret", "host=db dbname=app user=app password=***"),
    ("host=db user=app password=s3cret dbname=app", "host=db dbname=app user=app password=***"),
    ("host=db password='se cret' dbname=app", "host=db dbname=app password=***"),
    ("postgresql://app:se/cret@db/app", "<unparseable database URL>"),  # unencoded '/' in the password
    ("postgresql://app:s3cret@db:99x/app", "<unparseable database URL>"),
])
def test_passwords_are_masked(url, shown):
    assert redact_dsn(url) == shown


def test_public_config_has_no_password():
    config = processor_config(env={"DATABASE_URL": "postgresql://app:s3cret@db/app"})
    assert "s3cret" not in repr(config.public_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"num_workers": 0}, "invalid value for --numthreads: 0 (expected an integer >= 1)"),
    ({"sleep_interval_ms": -1}, "invalid value for --sleepintervalms: -1"),
    ({"schema": "x;drop"}, "invalid schema name: 'x;drop'"),
    ({"imports": ("not a module",)}, "invalid value for --import: 'not a module'"),
    ({"shutdown_timeout_seconds": -1}, "invalid value for --shutdown-timeout: -1"),
])
def test_bad_values_name_the_value_and_what_is_expected(kwargs, message):
    with pytest.raises(ConfigError) as error:
        processor_config(env={}, **kwargs)
    assert message in str(error.value)


def test_the_default_status_file_is_per_user_and_shared_by_processor_and_probe():
    uid = os.getuid()
    assert default_status_file({}) == Path(f"/tmp/procqueue-{uid}/status.json")
    assert default_status_file({"TMPDIR": "/scratch"}) == Path(f"/scratch/procqueue-{uid}/status.json")
    assert default_status_file({"PROCQUEUE_STATUS_FILE": "/run/pq.json", "TMPDIR": "/scratch"}) == Path("/run/pq.json")
    assert processor_config(env={"TMPDIR": "/scratch"}).status_file == default_status_file({"TMPDIR": "/scratch"})


def test_the_backoff_delay_is_read_from_the_environment_and_checked():
    assert processor_config(env={}).backoff_default_delay_seconds == 5
    assert processor_config(env={"TASK_BACKOFF_DEFAULT_DELAY_SECONDS": "0"}).backoff_default_delay_seconds == 0
    with pytest.raises(ConfigError, match="TASK_BACKOFF_DEFAULT_DELAY_SECONDS: '-1' .expected an integer >= 0"):
        processor_config(env={"TASK_BACKOFF_DEFAULT_DELAY_SECONDS": "-1"})
