"""The product's imports follow the data's path and never reach for the simulator.

``rtdecoder.decode`` imports neither the engines, the session nor the phantom (the contracts it
needs live in it); no production module imports ``rtdecoder.phantom`` except the phantom package
itself, the command-line modules and the demo. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rtdecoder"
# Modules that may wire the phantom world in: the CLI's command groups and the demo.
PHANTOM_ALLOWED = {"cli.py", "demo.py", "commands.py", "commands_phantom.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("**/*.py"))


def test_decode_imports_no_engines_session_or_phantom() -> None:
    bad = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in _modules() if path.relative_to(PACKAGE).parts[0] == "decode"
        for name in sorted(_imports(path))
        if name.startswith(("rtdecoder.engines", "rtdecoder.session", "rtdecoder.phantom", "engines", "session"))
    ]
    assert not bad, "\n".join(bad)


def test_production_modules_do_not_import_the_phantom() -> None:
    bad = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] != "phantom" and path.name not in PHANTOM_ALLOWED
        for name in sorted(_imports(path)) if name.startswith("rtdecoder.phantom")
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old", ["calibration", "engines"])
def test_one_top_level_package(old: str) -> None:
    # calibration and engines are sub-packages: installing the project adds only 'rtdecoder'.
    assert not (PACKAGE.parent / old).exists()
    assert (PACKAGE / old / "__init__.py").is_file()
