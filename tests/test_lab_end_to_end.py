"""A lab's whole path, through the command line, with none of the simulator (issue 12).

Everything a lab brings is made here with numpy, nibabel and PIL (any producer will do) and is read
only through the lab's path:

- a folder of images named by stim_id, and a tiny OpenCLIP (a local JSON architecture and a
  safetensors file, ``embedding.model: openclip``) that embeds them;
- a synthetic brain whose trial responses are a fixed linear map of each image's OpenCLIP tokens, so
  that retrieval means something;
- a tiny MindEye2 checkpoint in the released ``last.pth`` layout (the reference fixture's weights of
  ``tests/data/mindeye2_reference``, without the low-level head), converted with
  ``python -m rtdecoder.calibration.import_mindeye2``; the config it writes gives the lab config
  its model section;
- two earlier subjects' single-trial betas in the dataset format (``rtdecoder pretrain --data``);
- a calibration session in BIDS (4D ``*_bold.nii.gz`` with ``_bold.json`` sidecars and
  ``*_events.tsv`` naming each image by ``stim_file``), volumes stored in DICOM voxel order on an
  oblique grid, and a mask saved in standard NIfTI order (y axis reversed);
- a live run exported volume by volume (the BIDS 4D file split into 3D NIfTI files) into the folder
  ``rtdecoder run`` watches, its events naming images by ``stim_id``, while a subscriber written
  with plain pyzmq + msgpack (``docs/examples/subscriber.py``) receives every message.

The steps, each a subprocess (``python -c`` around the command's ``main``) that prints the
``rtdecoder.phantom`` modules it imported at the end, which must be none: import the checkpoint;
``pretrain --data`` with the lab config (the imported model's sizes, so either folder is a shared
model ``calibrate`` accepts; the imported one is checked to be); ``calibrate`` the BIDS session from
the pretrained model with the NIfTI-order mask and the images folder; ``run`` the bundle on the
export folder while the subscriber checks every decode (one per trial's first beta), that its
retrieval ids are the folder's stems, that ``seq`` has no gap, and that the shown image ranks above
chance.

``test_calibrating_from_a_whole_released_checkpoint`` is the same import with the low-level head
kept, as every released checkpoint has it: calibration keeps the head (frozen: nothing here makes
its targets) and the bundle's model has it.

Reconstruction is off (``session.reconstruct: false``): the lab's generator is unCLIP, which needs
the SDXL unCLIP weights, and the only small generator is the phantom's, which would import the
simulator. Retrieval, which every decode carries, is what is checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage
from test_candidates import write_images
from test_embedding import TINY_CLIP
from test_import_mindeye2 import reference_checkpoint
from test_mask_orientation import oblique_affine, y_flipped  # noqa: F401 (oblique_affine is a fixture)

from rtdecoder.calibration.dataset import write_dataset_json, write_subject_betas
from rtdecoder.config import load_config
from rtdecoder.embedding.base import make_embedder
from rtdecoder.embedding.cache import load_image_tokens
from rtdecoder.glm.design import trial_regressors
from rtdecoder.glm.events import Trial
from rtdecoder.glm.hrf import hrf_library

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TR_S = 2.0
GRID = (14, 16, 12)
TRIAL_S, IMAGE_S, LEAD_IN_S, TAIL_S = 4.0, 3.0, 4.0, 12.0
N_IMAGES = 24
TEST_IMAGES = 4  # the last 4 images are the test set: never trained on
CALIBRATION_TRIALS = 20  # per run, two runs
# A live run like the calibration runs: with a sustained visual response, the polynomial drift takes a
# share of it that depends on the run's length, so runs of another design get betas offset per voxel.
LIVE_TRIALS = 20
# The reference fixture's token grid: 4 tokens of width 40, so the lab's OpenCLIP is ViT-like with a
# 2 x 2 patch grid (64 px images, 32 px patches) of width 40.
TOKEN_SHAPE = (4, 40)
LAB_CLIP = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 40, "head_width": 20, "layers": 1}}
# The released checkpoint's parts that a model without the low-level head (blurry_recon=False) lacks.
LOWLEVEL_PREFIXES = ("backbone.blin1.", "backbone.bnorm.", "backbone.bupsampler.", "backbone.b_maps_projector.")

# Runs a command's main(argv) and reports the simulator modules it imported.
WRAPPER = textwrap.dedent("""
    import importlib, json, sys
    code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
    print("PHANTOM-MODULES", json.dumps(sorted(m for m in sys.modules if m.startswith("rtdecoder.phantom"))),
          flush=True)
    sys.exit(code)
""")


# ------------------------------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    # One thread: at these tiny sizes a second one only waits on the first (and on the other jobs of
    # a shared machine); the commands take torch's thread count from it.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(module: str, *args: str | Path) -> list[str]:
    return [sys.executable, "-c", WRAPPER, module, *map(str, args)]


def _phantom_modules(stdout: str) -> list[str]:
    assert "PHANTOM-MODULES" in stdout, stdout[-2000:]
    return json.loads(stdout.rsplit("PHANTOM-MODULES", 1)[1].splitlines()[0])


STEP_SECONDS: dict[str, float] = {}


def run_step(module: str, *args: str | Path, cwd: Path, timeout: float = 240) -> str:
    """One step as the lab runs it, in its folder ``cwd``; its stdout. Fails on an error or a simulator import."""
    started = time.monotonic()
    done = subprocess.run(_command(module, *args), capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=cwd)
    assert done.returncode == 0, f"{module} {args[:1]}: exit {done.returncode}\n{done.stderr[-4000:]}"
    assert _phantom_modules(done.stdout) == [], done.stdout  # the lab's path never imports the simulator
    STEP_SECONDS[str(args[0]) if module == "rtdecoder.cli" else module.rsplit(".", 1)[1]] = time.monotonic() - started
    return done.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _example_subscriber():
    """``docs/examples/subscriber.py``: the stimulus software's side, plain pyzmq + msgpack."""
    spec = importlib.util.spec_from_file_location("lab_subscriber", REPO / "docs" / "examples" / "subscriber.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_lab_openclip(folder: Path) -> tuple[Path, Path]:
    """A tiny OpenCLIP as a lab keeps one: a JSON architecture and a safetensors file of a whole CLIP."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(3)
    model = CLIP(**LAB_CLIP).eval()
    weights = folder / "lab-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    arch = folder / "lab-vit.json"
    arch.write_text(json.dumps(LAB_CLIP))
    return arch, weights


def write_released_checkpoint(path: Path) -> list[int]:
    """A ``last.pth`` in the released layout: the reference fixture's weights, no low-level head.

    Returns the voxel counts of its two subjects' adapters.
    """
    state, _ = reference_checkpoint()
    state = {k: v for k, v in state.items() if not k.startswith(LOWLEVEL_PREFIXES)}
    torch.save({"epoch": 1, "model_state_dict": state}, path)
    return [int(state[f"ridge.linears.{i}.weight"].shape[1]) for i in range(2)]


class SyntheticSubject:
    """Voxel responses that are a fixed linear map of the shown image's tokens, plus noise."""

    def __init__(self, features: np.ndarray, n_voxels: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        weights = rng.normal(size=(features.shape[1], n_voxels)) / np.sqrt(features.shape[1])
        self.responses = 2.0 * features @ weights  # (n_images, n_voxels), percent signal change
        self.visual = rng.uniform(2.0, 4.0, n_voxels)  # every image drives visual cortex up
        self.rng = rng

    def betas(self, image_rows: np.ndarray, noise: float = 0.3, offset: float = 0.0) -> np.ndarray:
        """Single-trial betas in percent signal change, as a GLM would give them."""
        noise = noise * self.rng.normal(size=(len(image_rows), self.responses.shape[1]))
        return (self.visual + self.responses[image_rows] + noise + offset).astype(np.float32)


def synthetic_brain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth positive 'head' on GRID and the block of voxels that respond (the mask)."""
    head = ndimage.gaussian_filter(rng.random(GRID), 1.5)
    head = 600.0 + 800.0 * (head - head.min()) / np.ptp(head)
    centre = (np.array(GRID) - 1) / 2.0
    radius = np.sqrt(sum(((np.indices(GRID)[a] - centre[a]) / (0.48 * GRID[a])) ** 2 for a in range(3)))
    head = np.where(radius < 1.0, head, 20.0).astype(np.float32)
    mask = np.zeros(GRID, bool)
    mask[4:10, 3:9, 3:8] = True  # off-centre in y: the flipped file differs
    return head, mask


def run_volumes(head, mask, subject: SyntheticSubject, trials: list[Trial], rows: np.ndarray, n_volumes: int,
                rng: np.random.Generator) -> np.ndarray:
    """A run's 4D series (DICOM voxel order): trial responses in the mask, noise everywhere.

    Each mask voxel responds with one of the HRF library's shapes (``glm.hrf: library`` finds it),
    the shape changing along the first voxel axis.
    """
    times = np.arange(n_volumes) * TR_S
    library = hrf_library(TR_S)
    shape_of = np.linspace(4, 15, GRID[0]).astype(int)[np.nonzero(mask)[0]]  # per mask voxel (C order)
    betas = subject.betas(rows, noise=0.2)  # (n_trials, n_voxels)
    psc = 0.3 * rng.normal(size=(n_volumes, int(mask.sum())))
    for shape in np.unique(shape_of):
        voxels = shape_of == shape
        psc[:, voxels] += trial_regressors(trials, times, library[shape], 50) @ betas[:, voxels]
    volumes = np.repeat(head[..., None], n_volumes, axis=3)
    volumes *= 1.0 + 0.002 * rng.normal(size=volumes.shape)
    volumes[mask] *= 1.0 + psc.T / 100.0
    return volumes.astype(np.float32)


def save_bold(path: Path, volumes: np.ndarray, affine: np.ndarray) -> None:
    """A BIDS 4D ``*_bold.nii.gz`` with its ``_bold.json`` sidecar, TR in both."""
    image = nib.Nifti1Image(volumes, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = TR_S
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    sidecar = path.with_name(path.name.replace("_bold.nii.gz", "_bold.json"))
    sidecar.write_text(json.dumps({"RepetitionTime": TR_S, "TaskName": "lab", "Manufacturer": "Siemens"}))


def write_events(path: Path, trials: list[Trial], column: str) -> None:
    """A lab's events.tsv: the image by ``stim_file`` (a path) or ``stim_id``, and ``is_test``."""
    lines = [f"onset\tduration\ttrial_type\t{column}\tis_test"]
    for t in trials:
        name = f"stimuli/{t.stim_id}.png" if column == "stim_file" else t.stim_id
        lines.append(f"{t.onset_s:.3f}\t{t.duration_s:.3f}\t{'test' if t.is_test else 'train'}\t{name}\t"
                     f"{'true' if t.is_test else 'false'}")
    path.write_text("\n".join(lines) + "\n")


def make_trials(stim_ids: list[str], image_rows: np.ndarray) -> list[Trial]:
    """A trial every TRIAL_S, every third slot left blank (as NSD's blank trials)."""
    slots = [k for k in range(2 * len(image_rows)) if k % 3 != 2][: len(image_rows)]
    # the ids the events reader gives the rows of a file without a trial_id column
    return [Trial(f"trial-{i + 1:03d}", LEAD_IN_S + TRIAL_S * slot, IMAGE_S, stim_id=stim_ids[row],
                  is_test=row >= N_IMAGES - TEST_IMAGES)
            for i, (slot, row) in enumerate(zip(slots, image_rows, strict=True))]


def n_volumes_for(trials: list[Trial]) -> int:
    return int(np.ceil((trials[-1].onset_s + IMAGE_S + TAIL_S) / TR_S))


def export_volumes(volumes: np.ndarray, affine: np.ndarray, folder: Path, pause_s: float = 0.02) -> None:
    """The scanner's side: each volume of the 4D series written as its own 3D NIfTI, complete on arrival."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(volumes.shape[3]):
        image = nib.Nifti1Image(volumes[..., index], affine)
        image.header.set_xyzt_units("mm", "sec")
        image.header["pixdim"][4] = TR_S
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        partial = folder / f"vol_{index:05d}.nii.part"  # a suffix the watcher ignores, then renamed
        partial.write_bytes(image.to_bytes())
        os.replace(partial, folder / f"vol_{index:05d}.nii")
        time.sleep(pause_s)


# ------------------------------------------------------------------------------------------ the tests


def test_a_lab_from_its_own_files_to_live_decodes(tmp_path, oblique_affine) -> None:  # noqa: F811
    started = time.monotonic()
    rng = np.random.default_rng(12)
    lab = tmp_path / "lab"

    # --- what the lab has: images, an OpenCLIP, a released checkpoint ---------------------------
    stim_ids = [f"nsd_{k:05d}" for k in rng.choice(73000, size=N_IMAGES, replace=False)]
    images = lab / "stimuli"
    write_images(images, stim_ids, seed=5)
    folder_stems = {p.stem for p in images.iterdir()}
    arch, weights = write_lab_openclip(lab / "models")
    checkpoint = lab / "models" / "last.pth"
    released_voxels = write_released_checkpoint(checkpoint)

    # --- step 1: import the released weights --------------------------------------------------
    imported = lab / "imported"
    out = run_step("rtdecoder.calibration.import_mindeye2", checkpoint, imported, "--subjects", "subj01", "subj02",
                   cwd=lab)
    assert f"--config {imported / 'rtdecoder-config.yaml'}" in out
    written = yaml.safe_load((imported / "rtdecoder-config.yaml").read_text())
    assert written["preset"] == "nsd"
    assert (written["model"]["n_tokens"], written["model"]["token_dim"]) == TOKEN_SHAPE
    assert written["model"]["use_prior"] and written["model"]["prior_network"] == "dalle2"
    assert not written["model"]["lowlevel"]

    # --- the lab's config: nsd with the imported model's sizes, the lab's OpenCLIP and images ---
    result_address = f"tcp://127.0.0.1:{_free_port()}"
    lab_config = {
        "preset": "nsd",
        "scanner": {"tr_s": TR_S},
        "embedding": {"model": "openclip", "openclip_arch": str(arch), "weights_path": str(weights),
                      "n_tokens": TOKEN_SHAPE[0], "token_dim": TOKEN_SHAPE[1], "cache_dir": str(lab / "cache")},
        "model": written["model"],  # the sizes calibrate --pretrained requires (the imported folder's)
        "training": {"epochs": 30, "batch_size": 8, "pretrain_epochs": 6, "pretrain_batch_size": 8, "lr": 3.0e-3,
                     "mixed_precision": False, "warmup_epochs": 2.0, "checkpoint_every_epochs": 1000},
        "glm": {"beta_wait_s": 10.0},
        "ingest": {"watch_mode": "inotify", "missing_volume_wait_s": 1.0},
        "candidates": {"images_dir": str(images)},
        "publish": {"result_address": result_address, "control_address": f"tcp://127.0.0.1:{_free_port()}"},
        # No reconstruction: the lab's generator (unCLIP) needs the SDXL unCLIP weights, and the only
        # small generator is the phantom's, which would import the simulator.
        "session": {"reconstruct": False, "heartbeat_s": 0.2, "idle_timeout_s": 20.0},
        "generator": {"engine_backend": "torch"},
    }
    config_path = lab / "lab.yaml"
    config_path.write_text(yaml.safe_dump(lab_config, sort_keys=False))
    config = load_config(config_path)
    # the imported folder loads, and is a shared model this config can calibrate from
    from rtdecoder.calibration.calibrate import _check_pretrained
    from rtdecoder.decode.model import MindEye2

    _check_pretrained(imported, config)
    assert MindEye2.from_pretrained(imported).subjects == dict(zip(("subj01", "subj02"), released_voxels, strict=True))

    # --- the synthetic brain's drive: the lab OpenCLIP's tokens of each image ------------------
    tokens = load_image_tokens(images, make_embedder(config.embedding), tmp_path / "producer-cache", progress=False)
    features = tokens.tokens_of(stim_ids).reshape(N_IMAGES, -1).astype(np.float64)
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    train_rows = np.arange(N_IMAGES - TEST_IMAGES)
    test_rows = np.arange(N_IMAGES - TEST_IMAGES, N_IMAGES)

    # --- step 2: pretrain on two earlier subjects' betas (the dataset format) ------------------
    data = lab / "pretraining"
    for k, n_voxels in enumerate((40, 33)):
        subject = SyntheticSubject(features, n_voxels, seed=100 + k)
        rows = np.concatenate([rng.permutation(np.concatenate([train_rows, test_rows[:2]])) for _ in range(2)])
        session = np.repeat([1, 2], len(rows) // 2)
        betas = np.concatenate([subject.betas(rows[session == s], offset=5.0 * s) for s in (1, 2)])
        write_subject_betas(data / f"sub-{k + 1:02d}", betas, [stim_ids[r] for r in rows], session,
                            [str(s) for s in session], rows >= N_IMAGES - TEST_IMAGES)
    shutil.copytree(images, data / "stimuli")  # embedded by the configured OpenCLIP
    write_dataset_json(data, producer="the lab's own GLM (test)")
    pretrained = lab / "pretrained"
    out = run_step("rtdecoder.cli", "pretrain", "--config", config_path, "--data", data, "--subjects",
                   "sub-01,sub-02", "--out", pretrained, "--no-progress", cwd=lab)
    assert f"pretrained model: {pretrained / 'model'}" in out
    record = json.loads((pretrained / "pretrain.json").read_text())
    assert record["subjects"] == ["sub-01", "sub-02"] and record["embedder"] == tokens.embedding_name
    assert record["n_trials"] == {"sub-01": 40, "sub-02": 40}  # the test images' trials left out
    assert MindEye2.from_pretrained(pretrained / "model").subjects == {"sub-01": 40, "sub-02": 33}

    # --- the new subject's calibration session, in BIDS ----------------------------------------
    head, mask = synthetic_brain(rng)
    brain = SyntheticSubject(features, int(mask.sum()), seed=200)
    func = lab / "bids" / "sub-09" / "ses-01" / "func"
    func.mkdir(parents=True)
    for run in (1, 2):
        rows = rng.permutation(np.concatenate([
            rng.choice(train_rows, CALIBRATION_TRIALS - TEST_IMAGES, replace=False), test_rows]))
        trials = make_trials(stim_ids, rows)
        stem = f"sub-09_ses-01_task-lab_run-{run:02d}"
        save_bold(func / f"{stem}_bold.nii.gz",
                  run_volumes(head, mask, brain, trials, rows, n_volumes_for(trials), rng), oblique_affine)
        write_events(func / f"{stem}_events.tsv", trials, "stim_file")
    # the mask as SPM, FSL and dcm2niix save it: the y axis reversed relative to the volumes
    flipped_mask, flipped_affine = y_flipped(mask.astype(np.uint8), oblique_affine)
    assert not np.array_equal(flipped_mask, mask)
    mask_path = lab / "mask.nii.gz"
    nib.save(nib.Nifti1Image(flipped_mask, flipped_affine), mask_path)

    # --- step 3: calibrate from the pretrained shared model ------------------------------------
    bundle = lab / "bundles" / "sub-09"
    out = run_step("rtdecoder.cli", "calibrate", "--config", config_path, "--session", func.parent, "--mask",
                   mask_path, "--images", images, "--pretrained", pretrained / "model", "--subject-id", "sub-09",
                   "--out", bundle, "--ensemble-size", "2", "--no-progress", cwd=lab)
    assert f"bundle: {bundle}" in out and "reoriented" in out
    assert "for the 2 models decoded together; each alone: seed 0" in out
    assert f"training trials: {2 * (CALIBRATION_TRIALS - TEST_IMAGES)}" in out
    from rtdecoder.bundle import SubjectBundle

    calibrated = SubjectBundle.load(bundle)
    np.testing.assert_array_equal(calibrated.mask, mask)  # the NIfTI-order file read as the same voxels
    assert calibrated.n_models == 2  # the run below decodes both seeds' models together
    assert calibrated.embedding_name == tokens.embedding_name
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["calibration_mask"]["reoriented"] == "(i, -j, k)" and metadata["calibration_tr_s"] == TR_S
    assert metadata["calibration_runs"] == [f"sub-09_ses-01_task-lab_run-{run:02d}" for run in (1, 2)]
    assert metadata["calibration_pretrained"] == str(pretrained / "model")

    # --- step 4: run; the scanner exports the live run volume by volume; a subscriber listens ---
    live_rows = rng.permutation(np.concatenate([
        rng.choice(train_rows, LIVE_TRIALS - TEST_IMAGES, replace=False), test_rows]))
    live_trials = make_trials(stim_ids, live_rows)
    n_live = n_volumes_for(live_trials)
    live_func = lab / "bids" / "sub-09" / "ses-02" / "func"
    live_func.mkdir(parents=True)
    live_bold = live_func / "sub-09_ses-02_task-lab_run-01_bold.nii.gz"
    save_bold(live_bold, run_volumes(head, mask, brain, live_trials, live_rows, n_live, rng), oblique_affine)
    events = live_func / "sub-09_ses-02_task-lab_run-01_events.tsv"
    write_events(events, live_trials, "stim_id")
    export, session_dir = lab / "export", lab / "sessions" / "sub-09_ses-02"
    export.mkdir()
    run_started = time.monotonic()
    received, stdout = subscribe_while_running(
        _command("rtdecoder.cli", "run", "--config", config_path, "--bundle", bundle, "--watch", export,
                 "--session-dir", session_dir, "--events", events, "--n-volumes", n_live, "--n-runs", 1),
        result_address, lab / "run-log",
        lambda: export_volumes(np.asanyarray(nib.load(live_bold).dataobj), oblique_affine, export / "series-01"),
    )
    STEP_SECONDS["run"] = time.monotonic() - run_started
    assert f"run-01: {n_live} volumes (0 missing)" in stdout and f"{LIVE_TRIALS} decodes" in stdout, stdout

    # gap-free from the heartbeat before the first volume to the run's end, and all of it published
    seqs = [m["seq"] for m in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    from rtdecoder.session.journal import read_records
    from rtdecoder.session.runner import JOURNAL_NAME

    journal = [r["message"] for r in read_records(session_dir / JOURNAL_NAME) if r["kind"] == "published"]
    assert [m["seq"] for m in journal] == list(range(len(journal))) and seqs[-1] == len(journal) - 1
    volumes = [m["data"] for m in received if m["topic"] == "volume"]
    assert [v["tr_index"] for v in volumes] == list(range(n_live)) and not any(v["missing"] for v in volumes)

    # every decode arrives: one per trial's first beta, and only those
    first_betas = {m["seq"]: m["data"] for m in received
                   if m["topic"] == "beta" and not m["data"]["is_update"] and not m["data"]["is_final"]}
    decodes = [m["data"] for m in received if m["topic"] == "decode"]
    assert len(decodes) == len([m for m in journal if m["topic"] == "decode"]) == LIVE_TRIALS
    assert sorted(d["trial_id"] for d in decodes) == sorted(t.trial_id for t in live_trials)
    assert sorted(d["beta_seq"] for d in decodes) == sorted(first_betas)
    shown = {t.trial_id: t.stim_id for t in live_trials}
    for d in decodes:
        assert d["stim_id"] == shown[d["trial_id"]] == first_betas[d["beta_seq"]]["stim_id"]
        retrieval = d["retrieval"]
        assert len(retrieval["ids"]) == config.session.retrieval_top_k
        assert set(retrieval["ids"]) <= folder_stems  # retrieval ids drawn from the lab's folder
        assert retrieval["n_candidates"] == N_IMAGES and 1 <= retrieval["shown_rank"] <= N_IMAGES
        assert d["reconstruction"] == "disabled"
    # the decodes follow the brain: the shown image ranks above chance (a median of 12.5 of 24)
    ranks = [d["retrieval"]["shown_rank"] for d in decodes]
    print(f"\nlive shown ranks among {N_IMAGES}: {sorted(ranks)} (median {np.median(ranks)}); "
          + ", ".join(f"{k} {v:.1f} s" for k, v in STEP_SECONDS.items())
          + f"; total {time.monotonic() - started:.1f} s")
    assert np.median(ranks) < (N_IMAGES + 1) / 2, sorted(ranks)


def subscribe_while_running(command: list[str], address: str, logs: Path, produce) -> tuple[list[dict], str]:
    """Start ``rtdecoder run``, subscribe, ``produce()`` once the stream is up; every message up to the run's end.

    Returns the messages (decoded as ``docs/examples/subscriber.py`` does) and the command's stdout.
    """
    import zmq

    unpack = _example_subscriber().unpack
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:  # files: a full pipe never blocks it
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=_env(), cwd=logs.parent)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    received: list[dict] = []

    def receive(timeout_s: float) -> dict | None:
        if sub.poll(int(timeout_s * 1000)):
            _topic, body = sub.recv_multipart()
            received.append(unpack(body))
            return received[-1]
        return None

    try:
        deadline = time.monotonic() + 180
        while not received:  # the stream is up (a heartbeat) before the scanner starts
            assert process.poll() is None, (logs / "stderr").read_text()[-4000:]
            assert time.monotonic() < deadline, "no heartbeat from rtdecoder run"
            receive(0.1)
        produce()
        while True:
            assert time.monotonic() < deadline, f"no run_end in time; {len(received)} messages"
            message = receive(0.5)
            if message is not None and message["topic"] == "status" and message["data"].get("state") == "run_end":
                break
        process.wait(timeout=60)
        while receive(0.2) is not None:  # whatever came after run_end, until the process exited
            pass
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        sub.close()
        context.term()
    stdout = (logs / "stdout").read_text()
    assert process.returncode == 0, (logs / "stderr").read_text()[-4000:]
    assert _phantom_modules(stdout) == [], stdout
    return received, stdout


def test_calibrating_from_a_whole_released_checkpoint(tmp_path) -> None:
    """The released ``last.pth`` has the low-level (blurry) head; a lab calibrates from it as imported."""
    from rtdecoder.calibration.betas import SessionBetas
    from rtdecoder.calibration.calibrate import calibrate
    from rtdecoder.calibration.import_mindeye2 import import_mindeye2
    from rtdecoder.embedding.cache import ImageTokens
    from rtdecoder.preprocess.mask import VoxelMask

    state, _ = reference_checkpoint()
    assert any(k.startswith(LOWLEVEL_PREFIXES) for k in state)
    torch.save({"epoch": 1, "model_state_dict": state}, tmp_path / "last.pth")
    model, _ = import_mindeye2(tmp_path / "last.pth", tmp_path / "imported", ["subj01", "subj02"])
    assert model.lowlevel_head is not None
    config = load_config(tmp_path / "imported" / "rtdecoder-config.yaml", overrides={
        "training": {"epochs": 2, "batch_size": 4, "mixed_precision": False}})
    rng = np.random.default_rng(0)
    grid = np.zeros((3, 3, 2), bool)
    grid.flat[:6] = True
    stim = [f"img{i % 6:02d}" for i in range(24)]
    trials = [Trial(f"t{i}", 4.0 * i, 3.0, stim_id=stim[i], is_test=i % 6 == 0) for i in range(24)]
    session = SessionBetas(rng.normal(size=(24, 6)).astype(np.float32), trials, ["run-01"] * 24,
                           VoxelMask(grid, np.eye(4)), np.ones((3, 3, 2), np.float32), np.ones(6, np.float32),
                           np.zeros(6, np.int32), 1.6)
    images = ImageTokens(sorted(set(stim)), rng.normal(size=(6, *TOKEN_SHAPE)).astype(np.float32), "test", "memory")
    # Nothing makes low-level targets here: the imported head is frozen and kept, not a reason to refuse.
    calibrate(config, tmp_path, tmp_path / "bundle", "sub-09", VoxelMask(grid, np.eye(4)),
              pretrained_dir=tmp_path / "imported", images=images, session=session, progress=False)
    from rtdecoder.bundle import SubjectBundle

    assert SubjectBundle.load(tmp_path / "bundle").load_model("cpu").lowlevel_head is not None
