"""CURVE key pairs for the result and control sockets (``rtdecoder keys make``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq.auth

from rtdecoder.errors import ConfigError


def make_keys(folder: str | Path, client_names: tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """Write a server key pair and one key pair per client.

    Layout::

        folder/server.key, folder/server.key_secret      the session's pair
        folder/<client>.key, folder/<client>.key_secret   each client's pair
        folder/authorized/<client>.key                    public keys the session accepts

    Point ``publish.server_secret_key_file`` at ``server.key_secret`` and
    ``publish.client_public_keys_dir`` at ``authorized/``; give each client its own
    ``.key_secret`` and ``server.key``. Existing files are never overwritten.

    Returns
    -------
    dict of str to Path
        ``server_secret``, ``server_public``, ``authorized`` and ``<client>_secret`` paths.
    """
    folder = Path(folder)
    authorized = folder / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    names = ("server", *client_names)
    for name in names:
        if (folder / f"{name}.key_secret").exists():
            raise ConfigError(f"{folder / (name + '.key_secret')}: already exists; not overwriting keys")
    paths: dict[str, Path] = {"authorized": authorized}
    for name in names:
        public, secret = zmq.auth.create_certificates(str(folder), name)
        paths[f"{name}_secret"] = Path(secret)
        paths[f"{name}_public"] = Path(public)
        if name != "server":
            shutil.copy(public, authorized / Path(public).name)
    return paths
