"""The command line: every help page works, and mistakes are one line with a non-zero exit."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from rtdecoder.cli import build_parser, main


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


ALL_COMMANDS = list(_command_paths(build_parser()))


def test_expected_commands_are_registered() -> None:
    names = {" ".join(path) for path in ALL_COMMANDS}
    assert {"config", "config check", "phantom"} <= names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "rtdecoder")
def test_every_help_page_works(path: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rtdecoder.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "config" in result.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["confg"], r"invalid choice: 'confg'"),
        (["config", "check"], r"required: config"),
        (["config", "check", "phantom", "--bogus"], r"unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(expected, err)


def test_bad_config_exits_non_zero_without_traceback(tmp_path, capsys) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("glm:\n  method: lsq\n")
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rtdecoder: error: ")
    assert "glm.method" in err
    assert "Traceback" not in err


def test_config_check_prints_resolved_config(capsys) -> None:
    assert main(["config", "check", "phantom"]) == 0
    assert "tr_s: 1.6" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--pretrain-epochs", "--calibration-epochs"])
def test_demo_refuses_zero_epochs_before_any_work(flag: str, tmp_path, capsys) -> None:
    work_dir = tmp_path / "demo"
    assert main(["demo", "--work-dir", str(work_dir), flag, "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rtdecoder: error: ") and f"{flag}: expected at least 1 epoch (got 0)" in err
    assert not work_dir.exists()
