"""CURVE key files: secret keys readable by their owner only, from the moment they exist."""

from __future__ import annotations

import os
import stat

import pytest
import zmq.auth

from rtdecoder.errors import ConfigError
from rtdecoder.publish.keys import make_keys


@pytest.fixture
def open_umask():
    """A umask of 0, as on a shared lab machine set up carelessly: modes come only from the code."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_secret_keys_are_owner_only_and_never_chmodded(tmp_path, open_umask, monkeypatch) -> None:
    def no_chmod(*args, **kwargs):  # a chmod after creation leaves a window with the file world-readable
        raise AssertionError("key files must be created with their mode, not chmod-ed afterwards")

    monkeypatch.setattr(os, "chmod", no_chmod)
    paths = make_keys(tmp_path / "keys", ("psychopy",))
    monkeypatch.undo()
    for name in ("server_secret", "psychopy_secret"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600, name
    for name in ("server_public", "psychopy_public"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    public, secret = zmq.auth.load_certificate(paths["psychopy_secret"])
    assert secret is not None and zmq.auth.load_certificate(paths["authorized"] / "psychopy.key") == (public, None)
    assert zmq.auth.load_certificate(paths["server_public"])[1] is None


def test_existing_key_files_are_not_overwritten(tmp_path) -> None:
    (tmp_path / "server.key").write_text("someone else's public key")
    with pytest.raises(ConfigError, match="server.key: already exists"):
        make_keys(tmp_path)
    assert (tmp_path / "server.key").read_text() == "someone else's public key"
    assert not (tmp_path / "server.key_secret").exists()


@pytest.mark.parametrize("name", ["../outside", "server", "", "a/b"])
def test_client_names_must_be_plain_file_names(tmp_path, name: str) -> None:
    with pytest.raises(ConfigError, match="client name"):
        make_keys(tmp_path / "keys", (name,))
    assert not (tmp_path / "outside.key_secret").exists()
