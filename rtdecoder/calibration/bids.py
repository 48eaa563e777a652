"""BIDS sessions as calibration input: the session's ``func/`` folder and its runs, found by file name.

What is accepted (:func:`find_func_dir`), given one folder:

- a session folder ``sub-08/ses-01`` (its ``func/`` is used);
- its ``func/`` folder itself, or any folder holding the ``*_events.tsv`` files directly;
- a subject folder: ``sub-08`` with ``func/`` (a dataset without sessions), or with exactly one
  ``ses-*`` folder. Several sessions are an error naming them: a calibration is one session, so
  the session folder must be given.

In the ``func/`` folder (:func:`find_bids_runs`), each run is either a 4D
``sub-08_ses-01_task-nsd_run-01_bold.nii.gz`` (or ``.nii``, read with its ``_bold.json``
sidecar: ``RepetitionTime``, ``SliceTiming``), or a folder of 3D volumes named like the run
(``sub-08_ses-01_task-nsd_run-01/``, or with the ``_bold`` suffix; not BIDS, which stores one 4D
file, but how a real-time export of a run is kept). Its events are the ``*_events.tsv`` whose
entities are all the run's (BIDS's inheritance rule: ``..._run-01_events.tsv`` applies to
``..._run-01_echo-2_bold.nii.gz``); with several, the one with the most entities. Runs without an
events file (e.g. resting state) are not calibration runs and are left out, with a log line;
an events file without its run's data is an error.

Entities:

- ``run`` orders the runs, numerically (``run-2`` before ``run-10``); it may be absent only
  when there is one run.
- Every other entity (``sub``, ``ses``, ``task``, ``acq``, ``ce``, ``rec``, ``dir``, ``echo``,
  ``part``, ...) must take one value over the session's runs: a calibration is one task on one
  acquisition. Runs of several tasks are an error naming the tasks, unless ``select`` picks one
  (``select={"task": "nsd"}``); several ``acq`` likewise. Multi-echo runs (several ``echo``
  values) are refused unless one echo is selected: the GLM models one series per run, so the
  echoes must be chosen or combined (e.g. optimally combined) before calibration.

Dependency decision: neither pybids nor bidsschematools is used; the file names are parsed here
(:func:`parse_bids_name`, a few dozen lines with tests). pybids is heavy for what is needed here:
its wheel is small (0.2 MB), but it pulls in about 44 MB of packages this project does not
otherwise have (SQLAlchemy, formulaic, bids-validator, bidsschematools, num2words,
universal_pathlib, ...) and adds about 0.3 s of imports; its ``BIDSLayout`` indexes a whole
dataset from its root (with ``dataset_description.json``) into a database, whereas calibration
is handed one session folder, and the folder-of-volumes runs are not BIDS, so a layout would not
index them at all. Its ``parse_file_entities`` alone is what is needed, and it is the part that is
simple to write. bidsschematools (0.2 MB, with acres and click) provides the BIDS schema (entity
names and order, validation regular expressions) but no parser of a session's runs; the only
thing it would replace is the short list of index entities below.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rtdecoder.errors import BundleError

logger = logging.getLogger(__name__)

EVENTS_SUFFIX = "events"
BOLD_SUFFIX = "bold"
BOLD_EXTENSIONS = (".nii.gz", ".nii")
#: Entities whose values are non-negative integers in BIDS ("index" entities): compared by number.
INDEX_ENTITIES = ("run", "echo", "flip", "inv", "split", "chunk")
#: Long entity names accepted in ``select``, mapped to the keys used in file names.
ENTITY_ALIASES = {
    "subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce", "reconstruction": "rec",
    "direction": "dir",
}
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")
_SUFFIX = re.compile(r"^[a-zA-Z0-9]+$")
_EXTENSION = re.compile(r"^(\.[a-zA-Z0-9]+)*$")


@dataclass(frozen=True)
class BidsName:
    """A BIDS file or folder name split into its parts.

    Attributes
    ----------
    entities : dict of str to str
        ``key -> label`` in the order written (``{"sub": "08", "ses": "01", "run": "01"}``).
    suffix : str or None
        The last part when it is not an entity (``"bold"``, ``"events"``); None when there is
        none (a folder named ``sub-08_ses-01_run-01``).
    extension : str
        From the first dot (``".nii.gz"``); ``""`` for none.
    """

    entities: dict[str, str]
    suffix: str | None
    extension: str

    @property
    def stem(self) -> str:
        """The entities joined back, without suffix or extension (``"sub-08_ses-01_run-01"``)."""
        return "_".join(f"{key}-{value}" for key, value in self.entities.items())


@dataclass(frozen=True)
class BidsRun:
    """One run of a BIDS session.

    Attributes
    ----------
    label : str
        The run's name without suffix (``"sub-08_ses-01_task-nsd_run-01"``).
    entities : dict of str to str
        Its entities.
    data_path : Path
        The 4D ``*_bold.nii[.gz]`` file, or the folder of 3D volumes.
    events_path : Path
        Its ``*_events.tsv``.
    sidecar_path : Path or None
        The run's ``*_bold.json`` when there is one.
    """

    label: str
    entities: dict[str, str]
    data_path: Path
    events_path: Path
    sidecar_path: Path | None

    @property
    def run_index(self) -> int | None:
        """The ``run`` entity as a number, None without one."""
        value = self.entities.get("run")
        return None if value is None else int(value)


def parse_bids_name(name: str) -> BidsName | None:
    """Split a BIDS name (``key-label`` entities joined by ``_``, an optional suffix, an extension).

    Parameters
    ----------
    name : str
        A file or folder name, without any parent folder.

    Returns
    -------
    BidsName or None
        None when the name is not of that form (a part that is neither ``key-label`` nor, last,
        an alphanumeric suffix; an entity given twice; no entity at all; an extension that is
        not dot-separated alphanumeric parts).

    Examples
    --------
    >>> parse_bids_name("sub-08_ses-01_task-nsd_run-01_bold.nii.gz")
    BidsName(entities={'sub': '08', 'ses': '01', 'task': 'nsd', 'run': '01'}, suffix='bold', extension='.nii.gz')
    >>> parse_bids_name("sub-08_ses-01_run-02").suffix is None
    True
    >>> parse_bids_name("vol_00001.nii") is None, parse_bids_name("events.tsv") is None
    (True, True)
    """
    if not name or name.startswith("."):
        return None
    stem, dot, rest = name.partition(".")
    extension = dot + rest
    if not _EXTENSION.match(extension):
        return None
    parts = stem.split("_")
    suffix = None
    if not _ENTITY.match(parts[-1]):
        if not _SUFFIX.match(parts[-1]):
            return None
        suffix = parts.pop()
    entities: dict[str, str] = {}
    for part in parts:
        match = _ENTITY.match(part)
        if match is None or match.group(1) in entities:
            return None
        entities[match.group(1)] = match.group(2)
    if not entities:
        return None
    return BidsName(entities, suffix, extension)


def find_func_dir(folder: str | Path) -> Path | None:
    """The folder holding a BIDS session's runs, given the session, its ``func/`` or its subject.

    Parameters
    ----------
    folder : str or Path
        A ``ses-*`` folder, its ``func/`` folder (or any folder holding ``*_events.tsv`` files),
        or a ``sub-*`` folder with ``func/`` or exactly one ``ses-*`` folder.

    Returns
    -------
    Path or None
        None when ``folder`` is none of these.

    Raises
    ------
    BundleError
        For a subject folder with several sessions (naming them).
    """
    folder = Path(folder)
    if _events_files(folder):
        return folder
    if (folder / "func").is_dir():
        return folder / "func"
    sessions = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("ses-"))
    if len(sessions) > 1:
        raise BundleError(
            f"{folder}: --session: a subject folder with {len(sessions)} sessions "
            f"({', '.join(p.name for p in sessions)}); expected one session per calibration: give its "
            f"session folder (e.g. {sessions[0]})"
        )
    if sessions and (sessions[0] / "func").is_dir():
        return sessions[0] / "func"
    return None


def find_bids_runs(func_dir: str | Path, select: Mapping[str, str | int] | None = None) -> list[BidsRun]:
    """The calibration runs of a BIDS ``func/`` folder, in ``run`` order.

    Parameters
    ----------
    func_dir : str or Path
        From :func:`find_func_dir`.
    select : mapping of str to str or int, optional
        Entity values the runs must have, e.g. ``{"task": "nsd", "echo": 2}``; keys as in file
        names (``"acq"``) or their long names (``"acquisition"``). Needed when the folder holds
        runs of several tasks, acquisitions or echoes.

    Returns
    -------
    list of BidsRun
        At least one; ordered by the ``run`` entity, numerically.

    Raises
    ------
    BundleError
        Naming the file or folder, the entity and what was expected: an events file without
        data, a malformed index entity, runs that differ in an entity other than ``run`` (several
        tasks, acquisitions, echoes, ...), a ``select`` that matches no run, two data for one run,
        or no run at all.
    """
    func_dir = Path(func_dir)
    events = _events_files(func_dir)
    data: list[tuple[BidsName, Path]] = []
    for entry in sorted(func_dir.iterdir()):
        parsed = parse_bids_name(entry.name)
        if parsed is None:
            continue
        if entry.is_file() and parsed.suffix == BOLD_SUFFIX and parsed.extension.lower() in BOLD_EXTENSIONS:
            data.append((parsed, entry))
        elif entry.is_dir() and not parsed.extension and parsed.suffix in (None, BOLD_SUFFIX):
            data.append((parsed, entry))
    for parsed, path in [*events, *data]:
        _check_index_entities(parsed, path)

    runs: list[BidsRun] = []
    used: set[Path] = set()
    for parsed, path in data:
        matches = [(e, p) for e, p in events if _applies(e.entities, parsed.entities)]
        if not matches:
            logger.info("%s: no *_events.tsv applies to it; not a calibration run, left out", path)
            continue
        most = max(len(e.entities) for e, _ in matches)
        best = [(e, p) for e, p in matches if len(e.entities) == most]
        if len(best) > 1:
            raise BundleError(
                f"{path}: events: {len(best)} events files apply equally ({', '.join(p.name for _, p in best)}); "
                "expected one *_events.tsv per run"
            )
        events_path = best[0][1]
        used.add(events_path)
        sidecar = func_dir / f"{parsed.stem}_{BOLD_SUFFIX}.json"
        sidecar_path = sidecar if sidecar.is_file() else None
        runs.append(BidsRun(parsed.stem, dict(parsed.entities), path, events_path, sidecar_path))
    for parsed, path in events:
        if path not in used:
            raise BundleError(
                f"{path}: no data for these events; expected {parsed.stem}_{BOLD_SUFFIX}.nii.gz (4D) or a folder "
                f"{parsed.stem} of volumes beside it"
            )
    if not runs:
        raise BundleError(
            f"{func_dir}: expected BIDS runs, each a *_{BOLD_SUFFIX}.nii.gz or a folder of volumes named like the "
            "run, with its *_events.tsv beside it (found none)"
        )
    runs = _selected(runs, select or {}, func_dir)
    _check_one_value_per_entity(runs, func_dir)
    return _in_run_order(runs, func_dir)


def _events_files(folder: Path) -> list[tuple[BidsName, Path]]:
    found = []
    for path in sorted(folder.glob(f"*_{EVENTS_SUFFIX}.tsv")):
        parsed = parse_bids_name(path.name)
        if parsed is None or parsed.suffix != EVENTS_SUFFIX or parsed.extension != ".tsv":
            raise BundleError(
                f"{path}: file name: expected key-label entities joined by '_' before _{EVENTS_SUFFIX}.tsv "
                "(e.g. sub-08_ses-01_task-nsd_run-01_events.tsv)"
            )
        if path.is_file():
            found.append((parsed, path))
    return found


def _check_index_entities(parsed: BidsName, path: Path) -> None:
    for key in INDEX_ENTITIES:
        value = parsed.entities.get(key)
        if value is not None and not value.isdigit():
            raise BundleError(
                f"{path}: {key}: expected a non-negative integer index, e.g. {key}-01 (got {key}-{value})"
            )


def _same(key: str, a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    # run-1 and run-01 are the same run; labels of other entities are compared as written
    return int(a) == int(b) if key in INDEX_ENTITIES and a.isdigit() and b.isdigit() else a == b


def _applies(events_entities: Mapping[str, str], data_entities: Mapping[str, str]) -> bool:
    return all(_same(key, value, data_entities.get(key)) for key, value in events_entities.items())


def _selected(runs: list[BidsRun], select: Mapping[str, str | int], func_dir: Path) -> list[BidsRun]:
    for raw_key, raw_value in select.items():
        key = ENTITY_ALIASES.get(str(raw_key), str(raw_key))
        value = str(raw_value)
        if key == "run":
            raise BundleError("select: run: a calibration takes every run of the session; expected no run selection")
        if key in INDEX_ENTITIES and not value.isdigit():
            raise BundleError(f"select: {key}: expected a non-negative integer (got {raw_value!r})")
        kept = [run for run in runs if _same(key, value, run.entities.get(key))]
        if not kept:
            found = sorted({run.entities[key] for run in runs if key in run.entities})
            have = f"found {', '.join(f'{key}-{v}' for v in found)}" if found else f"no run has a {key}- entity"
            raise BundleError(f"{func_dir}: select: {key}: expected runs with {key}-{value} ({have})")
        runs = kept
    return runs


def _check_one_value_per_entity(runs: list[BidsRun], func_dir: Path) -> None:
    keys = [key for run in runs for key in run.entities if key != "run"]
    for key in dict.fromkeys(keys):
        values = sorted({run.entities.get(key) or "" for run in runs})
        if len(values) < 2:
            continue
        shown = ", ".join(f"{key}-{v}" if v else f"no {key}-" for v in values)
        example = next(v for v in values if v)
        if key == "task":
            what = f"runs of {len(values)} tasks ({shown}); expected one task per calibration"
        elif key == "echo":
            what = (
                f"multi-echo runs ({shown}); expected one echo per calibration (the GLM models one series per "
                "run; or combine the echoes into one series first)"
            )
        else:
            what = f"runs differ in {key} ({shown}); expected one {key} per calibration"
        raise BundleError(f"{func_dir}: {key}: {what}: select one, e.g. select={{'{key}': '{example}'}}")


def _in_run_order(runs: list[BidsRun], func_dir: Path) -> list[BidsRun]:
    by_index: dict[int | None, BidsRun] = {}
    for run in runs:
        other = by_index.get(run.run_index)
        if other is not None:
            raise BundleError(
                f"{run.data_path}: run: {other.data_path.name} is the same run; expected one 4D "
                f"*_{BOLD_SUFFIX}.nii.gz or one folder of volumes per run"
            )
        by_index[run.run_index] = run
    if None in by_index and len(runs) > 1:
        raise BundleError(
            f"{by_index[None].data_path}: run: no run- entity, but {func_dir} holds {len(runs)} runs; expected "
            "run-<index> in every run's name"
        )
    return sorted(runs, key=lambda run: run.run_index or 0)
