"""CURVE key pairs for the result and control sockets (``rtdecoder keys make``).

The files are in pyzmq's certificate format (:func:`zmq.auth.load_certificate` reads them). A
secret key file is created readable by its owner only (mode 0600, set when the file is created,
so there is no moment at which another user can open it); public key files are 0644.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import zmq

from rtdecoder.errors import ConfigError

SECRET_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_BANNER = (
    "#   ****  Generated on {when} by rtdecoder keys make  ****\n"
    "#   ZeroMQ CURVE {kind} Certificate\n"
    "{warning}\n"
)


def make_keys(folder: str | Path, client_names: tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """Write a server key pair and one key pair per client.

    Layout::

        folder/server.key, folder/server.key_secret      the session's pair
        folder/<client>.key, folder/<client>.key_secret   each client's pair
        folder/authorized/<client>.key                    public keys the session accepts

    Point ``publish.server_secret_key_file`` at ``server.key_secret`` and
    ``publish.client_public_keys_dir`` at ``authorized/``; give each client its own
    ``.key_secret`` and ``server.key``. Existing files are never overwritten. ``.key_secret``
    files are created with mode 0600 (owner only); a folder this call creates gets 0700.

    Returns
    -------
    dict of str to Path
        ``server_secret``, ``server_public``, ``authorized`` and ``<client>_secret`` paths.

    Raises
    ------
    ConfigError
        When a key file to be written already exists, or a client name is not a plain file name.
    """
    folder = Path(folder)
    authorized = folder / "authorized"
    for name in client_names:
        # a name is a file name in ``folder``: no path separators, and not the server's own
        if not _NAME.fullmatch(name) or name == "server":
            raise ConfigError(
                f"keys make: client name: expected letters, digits, '.', '_' or '-', not 'server' (got {name!r})"
            )
    if len(set(client_names)) != len(client_names):
        raise ConfigError(f"keys make: client names: each must be given once (got {', '.join(client_names)})")
    names = ("server", *client_names)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    authorized.mkdir(exist_ok=True)
    for name in names:
        planned = [folder / f"{name}.key_secret", folder / f"{name}.key"]
        planned += [authorized / f"{name}.key"] if name != "server" else []
        for path in planned:
            if path.exists() or path.is_symlink():
                raise ConfigError(f"{path}: already exists; not overwriting keys")
    paths: dict[str, Path] = {"authorized": authorized}
    for name in names:
        public, secret = zmq.curve_keypair()
        paths[f"{name}_secret"] = _write_key_file(folder / f"{name}.key_secret", public, secret)
        paths[f"{name}_public"] = _write_key_file(folder / f"{name}.key", public)
        if name != "server":
            _write_key_file(authorized / f"{name}.key", public)
    return paths


def _write_key_file(path: Path, public: bytes, secret: bytes | None = None) -> Path:
    """Create one certificate file; exclusive, so neither an existing file nor a planted link is written through."""
    if secret is None:
        kind, mode = "Public", PUBLIC_KEY_MODE
        warning = "#   Give this file to the other side."
    else:
        kind, mode = "**Secret**", SECRET_KEY_MODE
        warning = "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions."
    text = _BANNER.format(when=datetime.datetime.now().isoformat(timespec="seconds"), kind=kind, warning=warning)
    text += f'metadata\ncurve\n    public-key = "{public.decode("ascii")}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    try:
        # the mode is given to open(2): the file never exists with wider permissions
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; not overwriting keys") from None
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(text)
    return path
