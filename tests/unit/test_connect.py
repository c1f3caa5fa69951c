"""Connecting to the runs DB: password from the environment, escaped, never shown."""

from __future__ import annotations

import logging

import pytest

from cax.errors import ConfigError, RunsDBError
from cax.runsdb import open_runsdb
from cax.runsdb.connect import redact, with_password

URI = "mongodb://eb@db1.example.org:27017,db2.example.org:27017/run?replicaSet=runs"


def test_with_password_escapes_and_prefers_new_variable(monkeypatch):
    monkeypatch.setenv("MONGO_PASSWORD", "old")
    monkeypatch.setenv("MONGODB_PASSWORD", "p@ss/w:rd%")
    assert with_password(URI).startswith("mongodb://eb:p%40ss%2Fw%3Ard%25@db1.example.org")


def test_with_password_accepts_original_variable(monkeypatch):
    monkeypatch.delenv("MONGODB_PASSWORD", raising=False)
    monkeypatch.setenv("MONGO_PASSWORD", "secret")
    assert with_password(URI).startswith("mongodb://eb:secret@")


def test_with_password_missing_is_a_config_error(monkeypatch):
    monkeypatch.delenv("MONGODB_PASSWORD", raising=False)
    monkeypatch.delenv("MONGO_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="MONGODB_PASSWORD"):
        with_password(URI)


def test_uri_without_user_is_unchanged():
    assert with_password("mongodb://127.0.0.1:27017/run") == "mongodb://127.0.0.1:27017/run"


def test_redact_hides_the_password():
    assert redact("mongodb://eb:hunter2@h/run") == "mongodb://eb:***@h/run"


def test_unreachable_server_error_never_shows_password(monkeypatch, caplog):
    monkeypatch.setenv("MONGODB_PASSWORD", "hunter2")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RunsDBError) as info:
        open_runsdb("mongodb://eb@127.0.0.1:1/run?serverSelectionTimeoutMS=200")
    assert "unreachable" in str(info.value)
    assert "hunter2" not in str(info.value) and "hunter2" not in caplog.text


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="expected mongodb://"):
        open_runsdb("postgres://x")
