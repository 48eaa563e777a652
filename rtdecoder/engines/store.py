"""Engine folders keyed by what they are built from, kept in the subject bundle.

An engine folder holds one subject's exported encoder and the prior denoiser (``encoder.onnx``,
``denoiser.onnx``, ``engine.json``) and, for TensorRT, their serialised plans. Its name is
``<backend>-<digest>``, where the digest is of an :class:`EngineKey`:

- the model's files (SHA-256 of ``model/config.json`` and ``model/model.safetensors``, see
  :func:`rtdecoder.bundle.model_folder_digest`) and the subject whose adapter is exported,
- the backend, the ONNX opset and the engine format version,
- for TensorRT also fp16, the largest batch, the TensorRT version and the GPU (a plan runs only
  with the TensorRT and the kind of GPU that built it).

A folder of that name with the key in its ``engine.json`` is the right one, so nothing is exported
again; a changed model or setting gives another name. Folders live in ``<bundle>/engines/`` (written
by ``rtdecoder engines build --bundle`` or, once, by the first run that needs them) or, when the
bundle folder is read-only, in ``generator.engine_dir``. They are built under a temporary name and
renamed when complete, so an interrupted build (TensorRT at NSD size takes minutes) is never taken
for an engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtdecoder.config import GeneratorConfig
from rtdecoder.engines.onnx_export import ENGINE_FORMAT_VERSION, ENGINE_META_NAME, export_onnx, read_engine_meta
from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

#: Backends whose engines are files (the torch backend runs the model itself).
FILE_BACKENDS = ("onnxruntime", "tensorrt")
KEY_FIELD = "engine_key"
_PLAN_NAMES = ("encoder.plan", "denoiser.plan")


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine folder's contents depend on.

    Attributes
    ----------
    weights_sha256 : str
        Digest of the model's files (or, for a model without a folder, of its state dict).
    subject_id : str
        Whose adapter the encoder holds.
    backend : str
        ``onnxruntime`` or ``tensorrt``.
    opset : int
        ONNX opset of the export.
    format_version : int
        :data:`~rtdecoder.engines.onnx_export.ENGINE_FORMAT_VERSION` of the export.
    fp16, max_batch : bool or None, int or None
        TensorRT only: fp16 kernels allowed; largest batch of the optimisation profile.
    tensorrt_target : str or None
        TensorRT only: its version and the GPU the plans are built for.
    """

    weights_sha256: str
    subject_id: str
    backend: str
    opset: int
    format_version: int = ENGINE_FORMAT_VERSION
    fp16: bool | None = None
    max_batch: int | None = None
    tensorrt_target: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The key as stored in ``engine.json`` under ``engine_key``."""
        return asdict(self)

    @property
    def digest(self) -> str:
        """16 hex characters of the SHA-256 of the key."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def folder_name(self) -> str:
        """``<backend>-<digest>``."""
        return f"{self.backend}-{self.digest}"


def engine_key(weights_sha256: str, subject_id: str, generator: GeneratorConfig, backend: str | None = None
               ) -> EngineKey:
    """The key of the engine a config asks for.

    Parameters
    ----------
    weights_sha256 : str
        :meth:`rtdecoder.bundle.SubjectBundle.model_sha256`, :func:`rtdecoder.bundle.model_folder_digest`
        or :func:`state_digest`.
    subject_id : str
    generator : GeneratorConfig
        ``onnx_opset``; for TensorRT also ``tensorrt_fp16`` and ``max_batch``.
    backend : str, optional
        Defaults to ``generator.engine_backend``.

    Raises
    ------
    ConfigError
        For the torch backend, which has no engine files.
    DecoderError
        For TensorRT without the ``tensorrt`` package or a CUDA device.
    """
    backend = backend or generator.engine_backend
    if backend not in FILE_BACKENDS:
        raise ConfigError(f"generator.engine_backend: {backend!r} builds no engine files; expected one of "
                          f"{', '.join(FILE_BACKENDS)}")
    if backend == "onnxruntime":
        return EngineKey(weights_sha256, subject_id, backend, generator.onnx_opset)
    return EngineKey(weights_sha256, subject_id, backend, generator.onnx_opset, fp16=generator.tensorrt_fp16,
                     max_batch=generator.max_batch, tensorrt_target=tensorrt_target())


def tensorrt_target() -> str:
    """``"tensorrt <version>, <GPU name> (sm_<major><minor>)"``: what a TensorRT plan is bound to."""
    from rtdecoder.engines.tensorrt import import_tensorrt
    from rtdecoder.errors import DecoderError

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise DecoderError("tensorrt backend: no CUDA device visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return f"tensorrt {trt.__version__}, {torch.cuda.get_device_name()} (sm_{major}{minor})"


def state_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's config and state dict, for models that have no folder to hash."""
    digest = hashlib.sha256(json.dumps(model.config.model_dump(mode="json"), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_complete(folder: str | Path, key: EngineKey) -> bool:
    """Whether ``folder`` holds a finished engine built for ``key``."""
    folder = Path(folder)
    try:
        meta = read_engine_meta(folder)
    except BundleError:
        return False
    if meta.get(KEY_FIELD) != key.as_dict():
        return False
    return key.backend != "tensorrt" or all((folder / name).is_file() for name in _PLAN_NAMES)


def engine_locations(bundle_dir: str | Path | None, engine_dir: str | Path) -> list[Path]:
    """Where engine folders are looked for, in order: ``<bundle>/engines``, then ``engine_dir``."""
    from rtdecoder.bundle import ENGINES_DIR_NAME

    found = [Path(bundle_dir) / ENGINES_DIR_NAME] if bundle_dir is not None else []
    return [*found, Path(engine_dir)]


def find_engine(key: EngineKey, locations: list[Path]) -> Path | None:
    """The first complete engine folder for ``key`` among ``locations``, or ``None``."""
    for parent in locations:
        if is_complete(parent / key.folder_name, key):
            return parent / key.folder_name
    return None


def ensure_engine(model: nn.Module, key: EngineKey, bundle_dir: str | Path | None, engine_dir: str | Path) -> Path:
    """The engine folder for ``key``: found, or built once (logged) where it can be written.

    Parameters
    ----------
    model : MindEye2
        The model ``key`` was computed from; exported only when no folder is found (export moves
        it to the CPU in float32).
    key : EngineKey
    bundle_dir : str, Path or None
        The subject bundle: its ``engines/`` is searched first and built into when writable.
    engine_dir : str or Path
        ``generator.engine_dir``: searched next, and built into when the bundle is read-only
        (or when there is no bundle).

    Returns
    -------
    Path
        A complete engine folder.
    """
    locations = engine_locations(bundle_dir, engine_dir)
    found = find_engine(key, locations)
    if found is not None:
        logger.info("engine: %s %s for %s (built earlier; not exported again)", key.backend, found, key.subject_id)
        return found
    for parent in locations:
        others = sorted(p.name for p in parent.glob(f"{key.backend}-*") if p.is_dir()) if parent.is_dir() else []
        if others:
            logger.info("engine: %s holds %s engines for other weights or settings (%s); not used",
                        parent, key.backend, ", ".join(others))
    target = next((parent for parent in locations if _writable(parent)), None)
    if target is None:
        raise BundleError(f"engine: none of {', '.join(str(p) for p in locations)} can be written; "
                          "set generator.engine_dir to a writable folder")
    if bundle_dir is not None and target != locations[0]:
        logger.warning("engine: the bundle folder %s is read-only; building the engine into %s instead",
                       bundle_dir, target)
    return build_engine(model, key, target)


def build_engine(model: nn.Module, key: EngineKey, parent: str | Path) -> Path:
    """Export (and for TensorRT, build) the engine for ``key`` into ``parent/<key.folder_name>``.

    Built under a temporary name and renamed when complete; a same-named folder that is not a
    complete engine for ``key`` (an older format, a damaged copy) is replaced.

    Returns
    -------
    Path
        The engine folder.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / key.folder_name
    started = time.perf_counter()
    logger.warning("engine: building the %s engine of %s into %s (once; TensorRT at NSD size takes minutes)",
                   key.backend, key.subject_id, final)
    partial = Path(tempfile.mkdtemp(prefix=f".{key.folder_name}.partial-", dir=parent))
    try:
        export_onnx(model, key.subject_id, partial, opset=key.opset)
        if key.backend == "tensorrt":
            from rtdecoder.engines.tensorrt import build_tensorrt_engines

            build_tensorrt_engines(partial, max_batch=key.max_batch or 1, fp16=bool(key.fp16))
        meta_path = partial / ENGINE_META_NAME
        meta = json.loads(meta_path.read_text())
        meta[KEY_FIELD] = key.as_dict()
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists() and not is_complete(final, key):
            shutil.rmtree(final)
        try:
            os.replace(partial, final)
        except OSError:
            if not is_complete(final, key):  # not another process that finished the same engine first
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("engine: %s built in %.1f s", final, time.perf_counter() - started)
    return final


def _writable(parent: Path) -> bool:
    """Whether engine folders can be created in ``parent`` (made if needed)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        return False
    return True
