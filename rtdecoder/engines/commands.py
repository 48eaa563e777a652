"""``rtdecoder engines ...``: build, check and time the inference engines; train the phantom generator.

::

    rtdecoder engines build --bundle BUNDLE [--backend onnxruntime|tensorrt] [--config run.yaml]
    rtdecoder engines build MODEL_DIR --subject sub-01 [--backend onnxruntime|tensorrt] [--config phantom]
    rtdecoder engines check (--bundle BUNDLE | MODEL_DIR --subject sub-01)   # each backend vs torch eager
    rtdecoder engines bench (--bundle BUNDLE | MODEL_DIR --subject sub-01) [--steps 20] [--repeats 20]
    rtdecoder engines train-generator [--config phantom]    # phantom teacher + distilled student
    rtdecoder engines distill-unclip --images DIR --out OUT [--steps 2] [--config nsd] [--device cuda]
                                                            # few-step student of the SDXL unCLIP UNet

Engine folders are named ``<backend>-<key>`` by :mod:`rtdecoder.engines.store` (the key: a digest of
the model's files, the subject and the engine settings of ``--config``'s generator section). With
``--bundle`` they go into ``BUNDLE/engines/`` (or ``generator.engine_dir`` when the bundle is
read-only), where ``rtdecoder run`` looks for them: build with the config you run with, or the run
builds its own once. With a model folder they go into ``generator.engine_dir``, unless ``--out``
names a folder (not keyed; ``check`` and ``bench`` take the same ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rtdecoder.errors import ConfigError

PARITY_RTOL = 1e-4
#: ``--backend`` names; ``onnx`` is the older spelling of ``onnxruntime``.
_BACKEND_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnxruntime", "tensorrt": "tensorrt"}


def add_engines_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``engines`` and its subcommands on the top-level parser."""
    engines = groups.add_parser("engines", help="ONNX / TensorRT / torch inference engines and generators")
    sub = engines.add_subparsers(dest="engines_command", metavar="ACTION", required=True)
    for name, handler, text in (
        ("build", _build, "export ONNX (and build TensorRT plans) for one subject, into its bundle"),
        ("check", _check, "compare every available backend with torch eager"),
        ("bench", _bench, "time beta -> tokens -> prior per backend"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("model", nargs="?", help="MindEye2 model folder (config.json + model.safetensors); "
                         "not with --bundle")
        cmd.add_argument("--bundle", type=Path, help="subject bundle: its model and subject, engines in BUNDLE/engines")
        cmd.add_argument("--subject", help="subject id whose adapter to use (with a model folder)")
        cmd.add_argument("--config", help="preset name or YAML file: the engine settings (default: the bundle's "
                         "config with --bundle, else phantom)")
        cmd.add_argument("--out", help="an engine folder of your own (not keyed; default: keyed folders in the "
                         "bundle or generator.engine_dir)")
        cmd.set_defaults(handler=handler)
        if name == "build":
            cmd.add_argument("--backend", choices=sorted(_BACKEND_NAMES), default=None,
                             help="default: generator.engine_backend, or onnxruntime when that is torch")
        if name == "bench":
            cmd.add_argument("--steps", type=int, default=None, help="prior steps (default: model.prior_sample_steps)")
            cmd.add_argument("--repeats", type=int, default=20)
    train = sub.add_parser("train-generator", help="train (or load) the phantom generator and its student")
    train.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    train.add_argument(
        "--ship", action="store_true",
        help="also copy the weights into the package (rtdecoder/phantom/generator_weights), "
        "so installs of this source tree start with them",
    )
    train.set_defaults(handler=_train_generator)
    distil = sub.add_parser(
        "distill-unclip",
        help="distil the unCLIP UNet (generator.unclip_weights_path) into a 1-4 step student, by progressive "
        "distillation; resumable; under torchrun on several GPUs",
    )
    distil.add_argument("--images", type=Path, required=True,
                        help="folder of training images (embedded with the configured embedder, encoded with the "
                        "teacher's VAE)")
    distil.add_argument("--out", type=Path, required=True,
                        help="student folder to write (set generator.unclip_student_path to it); a run killed "
                        "before the end resumes from OUT/checkpoints when started again")
    distil.add_argument("--steps", type=int, choices=(1, 2, 4), default=None,
                        help="student steps (default: generator.student_steps); "
                        "generator.unclip_distill_teacher_steps must be it times a power of two")
    distil.add_argument("--config", default="nsd", help="preset name or YAML file (default: nsd)")
    distil.add_argument("--teacher", type=Path, default=None,
                        help="teacher weights: a generative-models checkpoint or a diffusers folder with unet/ and "
                        "vae/ (default: generator.unclip_weights_path)")
    distil.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    distil.add_argument("--holdout", type=int, default=0,
                        help="keep the last N images (file-name order) out of training and compare the student "
                        "and the few-step teacher with the teacher's generator.n_steps images on them at the end")
    distil.add_argument("--no-progress", action="store_true", help="no progress bars")
    distil.set_defaults(handler=_distill_unclip)


class _Target:
    """What an engines command works on: a config, a model, its subject, and where engines live."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from rtdecoder.bundle import SubjectBundle, model_folder_digest
        from rtdecoder.config import load_config
        from rtdecoder.decode.model import MindEye2

        torch.set_num_threads(1)
        self.bundle = None
        if args.bundle is not None:
            if args.model is not None or args.subject is not None:
                raise ConfigError("--bundle: the bundle brings its model and subject; give no MODEL_DIR or --subject")
            self.bundle = SubjectBundle.load(args.bundle)
            self.config = load_config(args.config) if args.config else self.bundle.config
            self.model = self.bundle.load_model().eval()
            self.subject = self.bundle.subject_id
            self.weights_sha256 = self.bundle.model_sha256()
        else:
            if args.model is None or args.subject is None:
                raise ConfigError("engines: expected --bundle BUNDLE, or a MODEL_DIR with --subject")
            self.config = load_config(args.config or "phantom")
            self.model = MindEye2.from_pretrained(args.model).eval()
            self.subject = args.subject
            self.weights_sha256 = model_folder_digest(args.model)
        self.out = Path(args.out) if args.out else None

    @property
    def bundle_dir(self) -> Path | None:
        return None if self.bundle is None else self.bundle.directory

    def key(self, backend: str) -> Any:
        from rtdecoder.engines.store import engine_key

        return engine_key(self.weights_sha256, self.subject, self.config.generator, backend)

    def folder(self, backend: str) -> Path | None:
        """The complete engine folder of ``backend`` (``--out`` as given), or ``None``."""
        from rtdecoder.errors import DecoderError

        if self.out is not None:
            return self.out
        from rtdecoder.engines.store import engine_locations, find_engine

        try:
            key = self.key(backend)
        except DecoderError:  # tensorrt absent, or no GPU: there can be no plan to run here
            return None
        return find_engine(key, engine_locations(self.bundle_dir, self.config.generator.engine_dir))


def _engines(target: _Target) -> list:
    """Every backend that can run here, torch eager first."""
    import torch

    from rtdecoder.engines.onnx_export import ENGINE_META_NAME
    from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine
    from rtdecoder.engines.tensorrt import TensorRTEngine
    from rtdecoder.engines.torch_backend import TorchEngine

    model, subject = target.model, target.subject
    found = [TorchEngine(model, subject)]
    onnx_folder = target.folder("onnxruntime")
    if onnx_folder is not None and (onnx_folder / ENGINE_META_NAME).is_file():
        found.append(OnnxRuntimeEngine(onnx_folder))
    plan_folder = target.folder("tensorrt")
    if plan_folder is not None and (plan_folder / "encoder.plan").is_file():
        found.append(TensorRTEngine(plan_folder))
    if torch.cuda.is_available():
        found.append(TorchEngine(model, subject, device="cuda", compile=True))
    return found


def _build(args: argparse.Namespace) -> int:
    target = _Target(args)
    backend = _BACKEND_NAMES.get(args.backend or target.config.generator.engine_backend, "onnxruntime")
    if target.out is not None:
        from rtdecoder.engines.onnx_export import export_onnx

        export_onnx(target.model, target.subject, target.out, opset=target.config.generator.onnx_opset)
        if backend == "tensorrt":
            from rtdecoder.engines.tensorrt import build_tensorrt_engines

            build_tensorrt_engines(target.out, target.config.generator.max_batch, target.config.generator.tensorrt_fp16)
        print(f"engines written to {target.out}")
        return 0
    from rtdecoder.engines.store import ensure_engine

    folder = ensure_engine(target.model, target.key(backend), target.bundle_dir, target.config.generator.engine_dir)
    print(f"{backend} engine of {target.subject}: {folder}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.decode.engine import compare_engines

    target = _Target(args)
    engines = _engines(target)
    betas = torch.randn(2, target.model.adapters[target.subject].in_features,
                        generator=torch.Generator().manual_seed(0))
    failed = False
    for engine in engines[1:]:
        errors = compare_engines(engines[0], engine, betas)
        worst = max(errors.values())
        # fp16 TensorRT engines cannot meet the fp32 tolerance; they are reported, not failed.
        ok = worst < PARITY_RTOL
        failed |= not ok
        print(f"{engine.name:24s} max relative error {worst:.2e}  {'ok' if ok else 'FAIL'}  "
              + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    if len(engines) == 1:
        print("only torch eager is available; run 'rtdecoder engines build' first")
    return 1 if failed else 0


def _bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import torch

    from rtdecoder.decode.engine import sample_prior

    target = _Target(args)
    steps = args.steps or target.model.config.prior_sample_steps
    betas = torch.randn(1, target.model.adapters[target.subject].in_features)
    print(f"{'backend':24s} {'steps':>5s} {'median ms':>10s} {'p95 ms':>8s}")
    for engine in _engines(target):
        times = []
        for i in range(args.repeats + 2):
            start = time.perf_counter()
            out = engine.encode(betas)
            tokens = sample_prior(engine, out.backbone_tokens, steps, seed=i)
            if tokens.is_cuda:
                torch.cuda.synchronize()
            if i >= 2:  # the first calls warm caches (and record CUDA graphs)
                times.append(1000 * (time.perf_counter() - start))
        print(f"{engine.name:24s} {steps:5d} {np.median(times):10.1f} {np.percentile(times, 95):8.1f}")
    return 0


def _train_generator(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.config import load_config
    from rtdecoder.phantom.distill import load_or_distill_phantom_student
    from rtdecoder.phantom.generator import load_or_train_phantom_generator

    torch.set_num_threads(2)
    config = load_config(args.config)
    teacher = load_or_train_phantom_generator(config)
    student = load_or_distill_phantom_student(config)
    print(f"{teacher.name}: {config.generator.n_steps} steps; {student.name}: {config.generator.student_steps} steps; "
          f"cached under {config.generator.cache_dir}")
    if args.ship:
        import shutil

        from rtdecoder.phantom.generator import SHIPPED_WEIGHTS_DIR, phantom_cache_key

        name = f"phantom-{phantom_cache_key(config)}"
        for role in ("teacher", "student"):
            source = Path(config.generator.cache_dir) / name / role
            if source.is_dir() and source.resolve() != (SHIPPED_WEIGHTS_DIR / name / role).resolve():
                shutil.copytree(source, SHIPPED_WEIGHTS_DIR / name / role, dirs_exist_ok=True)
        print(f"shipped in {SHIPPED_WEIGHTS_DIR / name}")
    return 0


def _distill_unclip(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.config import load_config
    from rtdecoder.decode.generators.distill_unclip import run_distillation

    overrides = {"generator": {"student_steps": args.steps}} if args.steps else None
    config = load_config(args.config, overrides=overrides)
    if config.generator.kind != "unclip":
        raise ConfigError(f"distill-unclip: generator.kind: expected 'unclip' (got {config.generator.kind!r}; the "
                          "phantom generator is distilled by 'rtdecoder engines train-generator')")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_distillation(config, args.images, args.out, teacher_path=args.teacher, device=device, holdout=args.holdout,
                     progress=not args.no_progress)
    print(f"unCLIP student ({config.generator.student_steps} steps) in {args.out}; set "
          f"generator.unclip_student_path: {args.out}")
    return 0
