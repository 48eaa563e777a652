"""The subject bundle: everything calibration learns about one subject, in one folder.

Layout (written by :meth:`SubjectBundle.save`, checked by :meth:`SubjectBundle.load`)::

    bundle/
      metadata.json       subject, voxel count, mask hash, grid, embedding space, versions, dates
      config.json         the RTDecoderConfig calibration ran with
      mask.nii.gz         the voxel mask, in the motion reference's space
      reference.nii.gz    the motion reference volume
      stats.safetensors   per mask voxel: signal mean, beta mean/std, HRF library index
      glmdenoise.safetensors  GLMdenoise noise components (only with glm.glmdenoise and a count above 0):
                          pool_ijk, pool_mean, pool_std, components (rtdecoder.glm.denoise.NoiseComponents)
      model/              the fine-tuned MindEye2 (shared weights + this subject's adapter)
      model-1/, model-2/  with ``training.ensemble_size`` N > 1: the calibrations of seeds 1..N-1 more,
                          decoded together with model/ (rtdecoder.decode.ensemble); metadata n_models
      evaluation.json     held-out retrieval (optional)
      betas/              the calibration session's betas (betas.nii.gz, trials.tsv, mask.nii.gz;
                          rtdecoder.calibration.betas.save_betas): the live decoder's hubness
                          reference is rebuilt from them (rtdecoder.calibration.hubness_reference)
      engines/            inference engines built from model/ (optional; see rtdecoder.engines.store)
        onnxruntime-<key>/  encoder.onnx, denoiser.onnx, engine.json
        tensorrt-<key>/     the same plus encoder.plan, denoiser.plan

The bundle is the runtime artifact: ``rtdecoder engines build --bundle`` writes the engines into
it, keyed by a digest of the model's files and the engine settings, and ``rtdecoder run`` loads
them instead of exporting again (see :func:`rtdecoder.compose.make_engine`).

The live decoder loads a bundle and calls :meth:`SubjectBundle.check_volume` on the first volume:
any mismatch (grid, orientation, voxel count, embedding space, model version) is an error that
names the file and field, never a silent wrong answer. The same grid in another voxel order (axes
reversed or permuted) is not a mismatch: the front end reorients such volumes. The run's
configuration must agree with the bundle's where it fixes what the betas and the model mean
(:meth:`SubjectBundle.check_run_config`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from rtdecoder import __version__
from rtdecoder.config import RTDecoderConfig, read_saved_config, save_config
from rtdecoder.errors import BundleError, ConfigError
from rtdecoder.glm.denoise import NoiseComponents
from rtdecoder.preprocess.orientation import GridTransform, describe_grid, find_grid_transform

logger = logging.getLogger(__name__)

BUNDLE_VERSION = 1
AFFINE_TOLERANCE_MM = 1e-3
STATS_KEYS = ("signal_mean", "beta_mean", "beta_std", "hrf_index")
GLMDENOISE_NAME = "glmdenoise.safetensors"
#: The tensors of ``glmdenoise.safetensors``: :class:`~rtdecoder.glm.denoise.NoiseComponents`' arrays.
GLMDENOISE_KEYS = ("pool_ijk", "pool_mean", "pool_std", "components")
ENGINES_DIR_NAME = "engines"
MODEL_DIR_NAME = "model"
_EXTRA_MODEL_DIR = re.compile(r"model-[0-9]+")
#: The files of a model folder (``MindEye2.save_pretrained``) that its digest covers.
MODEL_FILES = ("config.json", "model.safetensors")
_HASH_CHUNK_BYTES = 16 << 20

#: Sections of the bundle's config that govern a run: they fix what the betas mean (GLM and
#: preprocessing) and what the model is (its sizes and the embedding space it predicts).
GOVERNED_SECTIONS = ("glm", "preprocess", "embedding", "model")
#: Keys of those sections that may differ at run time, and why (see :meth:`SubjectBundle.check_run_config`).
RUN_TIME_KEYS: dict[str, str] = {
    "glm.beta_wait_s": "when a beta is released, not what it estimates",
    "glm.min_residual_dof": "when a run's first betas are released, not what they estimate",
    "glm.publish_refinements": "whether refined betas are published",
    "glm.live_contrast": "how live betas are referenced before the run's end; final betas, which calibration "
    "fitted and the model was trained on, are the same either way",
    "glm.fracridge": "calibration only: the live GLM is OLS either way",
    "glm.fracridge_fractions": "calibration only",
    "glm.hrf_selection": "calibration only: the chosen HRFs are the bundle's hrf_index",
    "glm.glmdenoise_max_components": "calibration only: the chosen components are in the bundle's "
    "glmdenoise.safetensors",
    "preprocess.motion_max_iterations": "solver budget of the same rigid registration",
    "preprocess.motion_tolerance_mm": "solver stopping rule of the same rigid registration",
    "preprocess.motion_n_samples": "voxels sampled by the same rigid registration",
    "embedding.weights_path": "where the weights lie on this machine; their content is checked by "
    "SubjectBundle.check_embedding (the embedder's name holds a fingerprint)",
    "embedding.cache_dir": "where embeddings are cached",
    "model.prior_sample_steps": "sampling budget of the same prior (latency against quality)",
    "model.prior_sample_eta": "sampling noise of the same prior",
    "model.dropout": "training only",
    "model.prior_cond_drop": "training only",
}


def mask_hash(mask: np.ndarray) -> str:
    """SHA-256 of a boolean mask's shape and voxels (identifies the voxel order of betas)."""
    mask = np.asarray(mask, dtype=bool)
    digest = hashlib.sha256(repr(mask.shape).encode())
    digest.update(np.packbits(mask.ravel()).tobytes())
    return digest.hexdigest()


def model_folder_digest(model_dir: str | Path) -> str:
    """SHA-256 (hex) of a model folder's ``config.json`` and ``model.safetensors`` bytes.

    Engines built from a model are keyed by it, so a changed weight or size means a new engine.
    Reads every byte: about 1 s per GB.

    Parameters
    ----------
    model_dir : str or Path
        Written by ``MindEye2.save_pretrained``.

    Raises
    ------
    BundleError
        When one of :data:`MODEL_FILES` cannot be read.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        path = model_dir / name
        # The name and length go in too, so that bytes cannot shift from one file into the other.
        try:
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as err:
            raise BundleError(f"{path}: cannot read model file to hash it: {err.strerror}") from None
    return digest.hexdigest()


def model_dir_names(n_models: int) -> list[str]:
    """The bundle's model folders for ``n_models`` members: ``model``, ``model-1``, ``model-2``, ..."""
    return [MODEL_DIR_NAME] + [f"{MODEL_DIR_NAME}-{i}" for i in range(1, n_models)]


def models_digest(model_dirs: list[Path]) -> str:
    """The digest of one model folder (:func:`model_folder_digest`), or of an ensemble's folders in order."""
    if len(model_dirs) == 1:
        return model_folder_digest(model_dirs[0])
    digest = hashlib.sha256()
    for folder in model_dirs:
        digest.update(f"{folder.name}\0{model_folder_digest(folder)}\0".encode())
    return digest.hexdigest()


def _models_file_stats(model_dirs: list[Path]) -> dict[str, Any]:
    """:func:`_model_file_stats` of one model folder, or of each of an ensemble's by folder name."""
    if len(model_dirs) == 1:
        return _model_file_stats(model_dirs[0])
    return {folder.name: _model_file_stats(folder) for folder in model_dirs}


def _model_file_stats(model_dir: Path) -> dict[str, dict[str, int]]:
    """Size (bytes) and modification time (ns) of each model file: when both are unchanged, the
    digest recorded with them still holds."""
    stats = {}
    for name in MODEL_FILES:
        st = (model_dir / name).stat()
        stats[name] = {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    return stats


@dataclass
class SubjectBundle:
    """A calibrated subject.

    Attributes
    ----------
    subject_id : str
    config : RTDecoderConfig
        The configuration calibration used (GLM, preprocessing, model sizes, embedding).
    mask : ndarray of bool, shape (nx, ny, nz)
    affine : ndarray of shape (4, 4)
        Voxel-to-world (RAS+, mm) of the mask and reference grid.
    reference : ndarray of float32, shape (nx, ny, nz)
        Motion reference volume.
    signal_mean : ndarray of float32, shape (n_voxels,)
        Mean motion-corrected signal of each mask voxel over the calibration session; live time
        series are converted to percent signal change of it before the GLM.
    beta_mean, beta_std : ndarray of float32, shape (n_voxels,)
        Per-voxel statistics of the calibration betas; live betas are z-scored with them before
        decoding, as the model was trained.
    hrf_index : ndarray of int32, shape (n_voxels,)
        Chosen HRF library index per mask voxel (all 0 with the canonical HRF).
    model_dir : Path or None
        The fine-tuned model folder (``MindEye2.from_pretrained``); of an ensemble, the first member's.
    n_models : int
        Calibrations decoded together (``training.ensemble_size``): ``model/`` and, when above 1,
        ``model-1/`` .. ``model-<n-1>/`` beside it (:attr:`model_dirs`).
    embedding_name : str
        The embedder's full name (model and weights) the model predicts.
    evaluation : dict
        Held-out metrics from calibration.
    metadata : dict
        Everything in ``metadata.json``.
    directory : Path or None
        Where it was saved or loaded from.
    glmdenoise : NoiseComponents or None
        GLMdenoise's noise components (``glm.glmdenoise``): noise-pool voxel indices on the
        reference grid, their mean and spread, and the chosen spatial components; the live front
        end projects each volume's pool onto them for the GLM's extra nuisance columns. None
        without GLMdenoise or when calibration chose 0 components.
    """

    subject_id: str
    config: RTDecoderConfig
    mask: np.ndarray
    affine: np.ndarray
    reference: np.ndarray
    signal_mean: np.ndarray
    beta_mean: np.ndarray
    beta_std: np.ndarray
    hrf_index: np.ndarray
    model_dir: Path | None = None
    embedding_name: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None
    glmdenoise: NoiseComponents | None = None
    n_models: int = 1

    @property
    def model_dirs(self) -> list[Path]:
        """Every model folder, ``model_dir`` first (empty without a model)."""
        if self.model_dir is None:
            return []
        return [self.model_dir.parent / name for name in model_dir_names(self.n_models)]

    @property
    def n_voxels(self) -> int:
        """Voxels in the mask."""
        return int(self.mask.sum())

    @property
    def engines_dir(self) -> Path | None:
        """``<bundle>/engines``, where the engines built from its model live (``None`` before saving)."""
        return None if self.directory is None else self.directory / ENGINES_DIR_NAME

    def model_sha256(self) -> str:
        """Digest of the model's files (:func:`models_digest`: of every member's, for an ensemble), the
        key of its engines.

        ``save`` records it in ``metadata.json`` with each file's size and modification time; while
        those are unchanged the recorded digest is used, otherwise (files replaced, or copied
        without their timestamps) the files are hashed again.

        Raises
        ------
        BundleError
            When the bundle holds no model.
        """
        if self.model_dir is None:
            raise BundleError(f"subject {self.subject_id}: the bundle holds no model (calibrated without one)")
        recorded = self.metadata.get("model_sha256")
        try:
            unchanged = recorded is not None and self.metadata.get("model_files") == _models_file_stats(self.model_dirs)
        except OSError:
            unchanged = False  # a missing file: model_folder_digest names it
        if unchanged:
            return str(recorded)
        logger.info("%s: hashing the model files (no digest recorded for them as they are now)", self.model_dir)
        digest = models_digest(self.model_dirs)
        self.metadata["model_sha256"] = digest
        self.metadata["model_files"] = _models_file_stats(self.model_dirs)
        return digest

    def check_run_config(self, config: RTDecoderConfig) -> None:
        """Raise unless a run's config agrees with the bundle's where the bundle governs the run.

        The bundle's ``glm``, ``preprocess``, ``embedding`` and ``model`` sections fix what its
        statistics and model mean: betas of another GLM (HRF, LSS/LSA, drift model, motion
        confounds, the slice-time reference) or of other preprocessing are other numbers than the
        ones the model was trained on, and the model decodes into the embedding space it was
        trained for. So every key of those sections must match, except:

        - those in :data:`RUN_TIME_KEYS`, which change when or how fast, not what, is computed
          (``glm.beta_wait_s``, ``glm.publish_refinements``, the prior's sampling steps and eta,
          the motion solver's budget), or are calibration- or training-only (``glm.fracridge*``,
          ``glm.glmdenoise_max_components``,
          ``model.dropout``, ``model.prior_cond_drop``), or are paths on this machine
          (``embedding.weights_path``, whose content :meth:`check_embedding` checks, and
          ``embedding.cache_dir``);
        - keys that their section's choice leaves unused: ``glm.drift_order`` unless
          ``glm.drift_model`` is polynomial, ``glm.high_pass_hz`` unless it is cosine,
          ``embedding.openclip_arch`` unless ``embedding.model`` is openclip (and an architecture
          file is compared by its name, as the embedder's name does).

        Parameters
        ----------
        config : RTDecoderConfig
            The configuration the run was started with.

        Raises
        ------
        ConfigError
            Listing every differing key as ``glm.hrf: bundle 'library', run 'canonical'``.
        """
        mine = self.config.model_dump(mode="json")
        theirs = config.model_dump(mode="json")
        differences = []
        for section in GOVERNED_SECTIONS:
            for key in type(getattr(self.config, section)).model_fields:
                path = f"{section}.{key}"
                if path in RUN_TIME_KEYS or not _governs(path, mine[section]):
                    continue
                ours, run = mine[section][key], theirs[section][key]
                if path == "embedding.openclip_arch":
                    ours, run = _arch_name(ours), _arch_name(run)
                if ours != run:
                    differences.append(f"  {path}: bundle {ours!r}, run {run!r}")
        if differences:
            where = self.directory / "config.json" if self.directory is not None else "the bundle's config.json"
            raise ConfigError(
                f"run config {config.name!r} differs from the bundle's ({where}, subject {self.subject_id}) in keys "
                "that fix what the betas and the model mean; set them as the bundle has them:\n"
                + "\n".join(differences)
            )

    def save(self, directory: str | Path, model: Any | None = None) -> Path:
        """Write the bundle; ``model`` (a MindEye2, or a :class:`~rtdecoder.decode.ensemble.ModelEnsemble`
        whose members go to ``model/``, ``model-1/``, ...) is saved when given."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._check_shapes(directory)
        save_config(self.config, directory / "config.json")
        nib.save(nib.Nifti1Image(self.mask.astype(np.uint8), self.affine), directory / "mask.nii.gz")
        nib.save(nib.Nifti1Image(self.reference.astype(np.float32), self.affine), directory / "reference.nii.gz")
        save_file(
            {
                "signal_mean": self.signal_mean.astype(np.float32),
                "beta_mean": self.beta_mean.astype(np.float32),
                "beta_std": self.beta_std.astype(np.float32),
                "hrf_index": self.hrf_index.astype(np.int32),
            },
            str(directory / "stats.safetensors"),
        )
        if self.glmdenoise is not None:
            save_file(
                {
                    "pool_ijk": np.asarray(self.glmdenoise.pool_ijk, dtype=np.int32),
                    "pool_mean": np.asarray(self.glmdenoise.pool_mean, dtype=np.float32),
                    "pool_std": np.asarray(self.glmdenoise.pool_std, dtype=np.float32),
                    "components": np.ascontiguousarray(self.glmdenoise.components, dtype=np.float32),
                },
                str(directory / GLMDENOISE_NAME),
            )
        else:  # a stale file of an earlier calibration into the same folder must not pair with these betas
            (directory / GLMDENOISE_NAME).unlink(missing_ok=True)
        if model is not None:
            from rtdecoder.decode.ensemble import as_members

            members = as_members(model)
            names = model_dir_names(len(members))
            for member, name in zip(members, names, strict=True):
                member.save_pretrained(directory / name)
            for stale in directory.iterdir():  # an earlier, larger ensemble's members are not this bundle's
                if _EXTRA_MODEL_DIR.fullmatch(stale.name) and stale.name not in names and stale.is_dir():
                    shutil.rmtree(stale)
            self.model_dir = directory / MODEL_DIR_NAME
            self.n_models = len(members)
        self.directory = directory
        if self.evaluation:
            (directory / "evaluation.json").write_text(json.dumps(self.evaluation, indent=2) + "\n")
        self.metadata = {
            "_class_name": "SubjectBundle",
            "_version": BUNDLE_VERSION,
            "subject_id": self.subject_id,
            "n_voxels": self.n_voxels,
            "mask_sha256": mask_hash(self.mask),
            "grid_shape": list(self.mask.shape),
            "affine": np.asarray(self.affine, dtype=float).round(6).tolist(),
            "embedding": {
                "name": self.embedding_name,
                "model": self.config.embedding.model,
                "n_tokens": self.config.embedding.n_tokens,
                "token_dim": self.config.embedding.token_dim,
            },
            "rtdecoder_version": __version__,
            "has_model": self.model_dir is not None,
            "n_models": self.n_models if self.model_dir is not None else 0,
            "glmdenoise_n_components": self.glmdenoise.n_components if self.glmdenoise is not None else 0,
            **self._model_digest_fields(fresh=model is not None),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in self.metadata.items() if k.startswith("calibration_")},
        }
        (directory / "metadata.json").write_text(json.dumps(self.metadata, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SubjectBundle:
        """Read and cross-check a bundle; every problem names the file and the field."""
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"{directory}: not a subject bundle folder (no such folder)")
        meta_path = directory / "metadata.json"
        metadata = _read_json(meta_path)
        if metadata.get("_class_name") != "SubjectBundle":
            raise BundleError(
                f"{meta_path}: _class_name: expected 'SubjectBundle' (got {metadata.get('_class_name')!r})"
            )
        if metadata.get("_version") != BUNDLE_VERSION:
            raise BundleError(f"{meta_path}: _version: expected {BUNDLE_VERSION} (got {metadata.get('_version')!r})")
        config = read_saved_config(directory / "config.json")
        mask_img = _read_nifti(directory / "mask.nii.gz")
        mask = np.asarray(mask_img.dataobj) > 0
        reference = np.asarray(_read_nifti(directory / "reference.nii.gz").dataobj, dtype=np.float32)
        stats = _read_tensors(directory / "stats.safetensors", STATS_KEYS, "statistics")
        model_dir = directory / MODEL_DIR_NAME
        glmdenoise = _read_glmdenoise(directory / GLMDENOISE_NAME, int(metadata.get("glmdenoise_n_components", 0)))
        bundle = cls(
            subject_id=str(metadata.get("subject_id", "")),
            config=config,
            mask=mask,
            affine=mask_img.affine,
            reference=reference,
            signal_mean=stats["signal_mean"],
            beta_mean=stats["beta_mean"],
            beta_std=stats["beta_std"],
            hrf_index=stats["hrf_index"],
            model_dir=model_dir if metadata.get("has_model") else None,
            embedding_name=str(metadata.get("embedding", {}).get("name", "")),
            evaluation=_read_json(directory / "evaluation.json") if (directory / "evaluation.json").exists() else {},
            metadata=metadata,
            directory=directory,
            glmdenoise=glmdenoise,
            n_models=_read_n_models(meta_path, metadata),
        )
        bundle._check_shapes(directory)
        if metadata.get("mask_sha256") != mask_hash(mask):
            raise BundleError(f"{directory / 'mask.nii.gz'}: does not match metadata.json mask_sha256 (mask changed?)")
        if metadata.get("n_voxels") != bundle.n_voxels:
            raise BundleError(
                f"{meta_path}: n_voxels: {metadata.get('n_voxels')} but mask.nii.gz has {bundle.n_voxels} voxels"
            )
        for folder in bundle.model_dirs:
            if not (folder / "config.json").is_file():
                raise BundleError(
                    f"{folder}: metadata.json says the bundle has {bundle.n_models} model(s), but "
                    f"{folder.name}/config.json is missing"
                )
        return bundle

    def load_model(self, device: str = "cpu") -> Any:
        """The fine-tuned MindEye2 (a :class:`~rtdecoder.decode.ensemble.ModelEnsemble` when the bundle
        holds several), checked against this bundle's voxel count and embedding."""
        from rtdecoder.decode.ensemble import as_model
        from rtdecoder.decode.model import MindEye2

        if self.model_dir is None:
            raise BundleError(f"subject {self.subject_id}: the bundle holds no model (calibrated without one)")
        members = []
        for folder in self.model_dirs:
            member = MindEye2.from_pretrained(folder, device=device)
            self._check_model(member, folder / "config.json")
            members.append(member)
        return as_model(members)

    def _check_model(self, model: Any, config_path: Path) -> None:
        if model.subjects.get(self.subject_id) != self.n_voxels:
            raise BundleError(
                f"{config_path}: subjects: expected an adapter for {self.subject_id!r} with {self.n_voxels} voxels "
                f"(the mask's count); got {model.subjects}"
            )
        expected = (self.config.embedding.n_tokens, self.config.embedding.token_dim)
        if (model.config.n_tokens, model.config.token_dim) != expected:
            raise BundleError(
                f"{config_path}: model: predicts {model.config.n_tokens}x{model.config.token_dim} tokens but the "
                f"bundle's embedding space is {expected[0]}x{expected[1]}"
            )

    def check_volume(self, shape: tuple[int, ...], affine: np.ndarray, source: str = "volume") -> GridTransform:
        """Raise if a live volume's grid or orientation differs from the calibration's.

        A volume on the bundle's grid stored in another voxel order (axes reversed or permuted,
        e.g. an SPM-converted NIfTI of a DICOM-calibrated subject) is accepted: the returned
        transform brings its data into the bundle's order (the front end applies it to every
        volume).

        Parameters
        ----------
        shape : tuple of int
            The volume's ``(nx, ny, nz)``.
        affine : ndarray of shape (4, 4)
            Its voxel-to-world (RAS+, mm) matrix.
        source : str, default="volume"
            The volume's file, first in error messages.

        Returns
        -------
        GridTransform
            The identity when the volume is in the bundle's voxel order.

        Raises
        ------
        BundleError
            Naming the file, both grids and the largest difference in mm.
        """
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise BundleError(f"{source}: affine: expected a (4, 4) voxel-to-world matrix (got shape {affine.shape})")
        match = find_grid_transform(shape, affine, self.mask.shape, self.affine)
        grids = (
            f"volume {describe_grid(shape, affine)}; bundle {describe_grid(self.mask.shape, self.affine)}"
        )
        if not match.shape_matches:
            raise BundleError(
                f"{source}: grid {tuple(shape)} does not match the bundle's mask grid {tuple(self.mask.shape)} "
                f"(subject {self.subject_id}), in any voxel order ({grids}); was the protocol changed since "
                "calibration?"
            )
        tolerance_mm = max(AFFINE_TOLERANCE_MM, 0.5 * float(np.abs(self.affine[:3, :3]).max()))
        if match.difference_mm > tolerance_mm:
            raise BundleError(
                f"{source}: voxel-to-world affine differs from the bundle's by {match.difference_mm:.3f} mm "
                f"(the largest distance between the grids' corner voxels, in any voxel order; {grids}); "
                "the mask would land on the wrong voxels (re-run calibration or check the slice prescription)"
            )
        if not match.transform.is_identity:
            logger.info(
                "%s: on the bundle's grid in another voxel order (target axes = file axes %s, minus: reversed); "
                "each volume is reoriented before motion correction", source, match.transform.describe(),
            )
        return match.transform

    def check_embedding(self, embedding_name: str) -> None:
        """Raise if the live decoder's embedder is not the one the model was trained to predict."""
        if self.embedding_name and embedding_name != self.embedding_name:
            raise BundleError(
                f"metadata.json: embedding.name: bundle predicts {self.embedding_name!r} but the decoder "
                f"uses {embedding_name!r}"
            )

    def _model_digest_fields(self, fresh: bool) -> dict[str, Any]:
        """``model_sha256`` and ``model_files`` for metadata.json (empty without a model folder)."""
        if self.model_dir is None or not all((d / MODEL_FILES[1]).is_file() for d in self.model_dirs):
            return {}
        if fresh:  # just written: whatever digest was recorded before is of other files
            self.metadata.pop("model_sha256", None)
        return {"model_sha256": self.model_sha256(), "model_files": _models_file_stats(self.model_dirs)}

    def _check_shapes(self, directory: Path) -> None:
        n = self.n_voxels
        if self.reference.shape != self.mask.shape:
            raise BundleError(
                f"{directory / 'reference.nii.gz'}: shape {self.reference.shape} differs from mask {self.mask.shape}"
            )
        for name in STATS_KEYS:
            value = getattr(self, name)
            if value.shape != (n,):
                raise BundleError(
                    f"{directory / 'stats.safetensors'}: {name}: expected shape ({n},) for {n} mask voxels "
                    f"(got {value.shape})"
                )
        for name in ("signal_mean", "beta_std"):
            if not np.all(getattr(self, name) > 0):
                raise BundleError(f"{directory / 'stats.safetensors'}: {name}: expected positive values")
        if self.glmdenoise is not None:
            where = directory / GLMDENOISE_NAME
            if not self.config.glm.glmdenoise:
                raise BundleError(
                    f"{where}: noise components, but the bundle's config.json has glm.glmdenoise false; expected "
                    "them only from a calibration with GLMdenoise"
                )
            self.glmdenoise.check(self.mask.shape, str(where))


def _governs(path: str, section: dict[str, Any]) -> bool:
    """Whether a key of a governed section is used under that section's other choices."""
    if path == "glm.drift_order":
        return section["drift_model"] == "polynomial"
    if path == "glm.high_pass_hz":
        return section["drift_model"] == "cosine"
    if path == "embedding.openclip_arch":
        return section["model"] == "openclip"
    return True


def _arch_name(arch: str) -> str:
    # A local architecture file may lie elsewhere on the scanner host; its name is what identifies it.
    return Path(arch).stem if arch.endswith(".json") else arch


def _read_tensors(path: Path, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """A safetensors file of the bundle, with every tensor in ``keys`` (an error names the file and the key)."""
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as err:
        raise BundleError(f"{path}: cannot read {what}: {err}") from None
    for key in keys:
        if key not in tensors:
            raise BundleError(f"{path}: missing tensor {key!r}")
    return tensors


def _read_glmdenoise(path: Path, n_components: int) -> NoiseComponents | None:
    """The noise components of ``glmdenoise.safetensors``; None when metadata.json records none."""
    if not path.is_file():
        if n_components:
            raise BundleError(
                f"{path}: missing, but metadata.json records glmdenoise_n_components {n_components}"
            )
        return None
    tensors = _read_tensors(path, GLMDENOISE_KEYS, "noise components")
    components = NoiseComponents(
        tensors["pool_ijk"].astype(np.int64), tensors["pool_mean"], tensors["pool_std"], tensors["components"]
    )
    if components.components.ndim != 2 or components.n_components != n_components:
        raise BundleError(
            f"{path}: components: {components.components.shape} but metadata.json records glmdenoise_n_components "
            f"{n_components}; expected shape (n_pool, {n_components})"
        )
    return components


def _read_n_models(meta_path: Path, metadata: dict[str, Any]) -> int:
    """``n_models`` of metadata.json: 1 when absent (bundles from before ensembles), else a count >= 1."""
    if not metadata.get("has_model"):
        return 1
    value = metadata.get("n_models", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BundleError(f"{meta_path}: n_models: expected a whole number >= 1 of model folders (got {value!r})")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as err:
        raise BundleError(f"{path}: cannot read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise BundleError(f"{path}: byte {err.start}: not text; expected a JSON object in UTF-8") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return value


def _read_nifti(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except (OSError, nib.filebasedimages.ImageFileError) as err:
        raise BundleError(f"{path}: cannot read NIfTI: {err}") from None
