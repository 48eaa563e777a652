"""The ``rtdecoder`` command line.

Each group of subcommands is registered by the module that owns the work (``phantom`` by
:mod:`rtdecoder.commands_phantom`, which imports the simulator only when a phantom command
runs, and so on); this module builds the parser, dispatches, and turns every
:class:`~rtdecoder.errors.DecoderError` into one line on stderr and a non-zero exit. Heavy
libraries (torch, diffusers) are imported inside the handlers so that ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rtdecoder import __version__
from rtdecoder.errors import DecoderError, WireProtocolError

EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the command, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one subparser per command group."""
    parser = _OneLineParser(
        prog="rtdecoder",
        description="Real-time fMRI decoder: watch scanner exports, estimate single-trial betas, "
        "decode them into image embeddings, retrievals and reconstructions, publish over ZeroMQ.",
    )
    parser.add_argument("--version", action="version", version=f"rtdecoder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    groups = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_OneLineParser
    )
    _add_config_commands(groups)
    _add_keys_commands(groups)

    from rtdecoder.commands_phantom import add_phantom_commands

    add_phantom_commands(groups)

    from rtdecoder.calibration.commands import add_calibration_commands

    add_calibration_commands(groups)

    from rtdecoder.engines.commands import add_engines_commands

    add_engines_commands(groups)

    from rtdecoder.session.commands import add_session_commands

    add_session_commands(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except (DecoderError, WireProtocolError) as err:
        print(f"rtdecoder: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("rtdecoder: interrupted", file=sys.stderr)
        return 130


def _add_config_commands(groups: argparse._SubParsersAction) -> None:
    config = groups.add_parser("config", help="check and show configurations")
    sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a config file or preset and print it resolved")
    check.add_argument("config", help="preset name (phantom, nsd) or YAML file")
    check.add_argument("--quiet", action="store_true", help="print nothing when valid")
    check.set_defaults(handler=_config_check)


def _config_check(args: argparse.Namespace) -> int:
    import yaml

    from rtdecoder.config import load_config

    config = load_config(args.config)
    if not args.quiet:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _add_keys_commands(groups: argparse._SubParsersAction) -> None:
    keys = groups.add_parser("keys", help="CURVE key pairs for authenticated result streams")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    make = sub.add_parser("make", help="write a server key pair and client key pairs")
    make.add_argument("folder", help="folder to write the keys into")
    make.add_argument("--clients", default="client", help="comma-separated client names (default: client)")
    make.set_defaults(handler=_keys_make)


def _keys_make(args: argparse.Namespace) -> int:
    from rtdecoder.publish.keys import make_keys

    names = tuple(name.strip() for name in args.clients.split(",") if name.strip())
    paths = make_keys(args.folder, names)
    print(f"server secret key: {paths['server_secret']}  (publish.server_secret_key_file)")
    print(f"authorized clients: {paths['authorized']}  (publish.client_public_keys_dir)")
    for name in names:
        print(f"client {name}: {paths[name + '_secret']} + {paths['server_public']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
