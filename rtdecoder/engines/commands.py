"""``rtdecoder engines ...``: build, check and time the inference engines; train the phantom generator.

::

    rtdecoder engines build MODEL_DIR --subject sub-01 [--backend onnx|tensorrt] [--config phantom]
    rtdecoder engines check MODEL_DIR --subject sub-01      # each backend vs torch eager, 1e-4 relative
    rtdecoder engines bench MODEL_DIR --subject sub-01 [--steps 20] [--repeats 20]
    rtdecoder engines train-generator [--config phantom]    # phantom teacher + distilled student

Engine folders go to ``<generator.engine_dir>/<model folder name>-<subject>`` unless ``--out``
names one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PARITY_RTOL = 1e-4


def add_engines_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``engines`` and its subcommands on the top-level parser."""
    engines = groups.add_parser("engines", help="ONNX / TensorRT / torch inference engines and generators")
    sub = engines.add_subparsers(dest="engines_command", metavar="ACTION", required=True)
    for name, handler, text in (
        ("build", _build, "export ONNX (and build TensorRT plans) for one subject"),
        ("check", _check, "compare every available backend with torch eager"),
        ("bench", _bench, "time beta -> tokens -> prior per backend"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("model", help="MindEye2 model folder (config.json + model.safetensors)")
        cmd.add_argument("--subject", required=True, help="subject id whose adapter to use")
        cmd.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
        cmd.add_argument("--out", help="engine folder (default: under generator.engine_dir)")
        cmd.set_defaults(handler=handler)
        if name == "build":
            cmd.add_argument("--backend", choices=("onnx", "tensorrt"), default="onnx")
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


def _setup(args: argparse.Namespace):
    import torch

    from rtdecoder.config import load_config
    from rtdecoder.decode.model import MindEye2

    torch.set_num_threads(1)
    config = load_config(args.config)
    model = MindEye2.from_pretrained(args.model).eval()
    default_folder = Path(config.generator.engine_dir) / f"{Path(args.model).name}-{args.subject}"
    folder = Path(args.out) if args.out else default_folder
    return config, model, folder


def _engines(model, subject: str, folder: Path) -> list:
    """Every backend that can run here, torch eager first."""
    import torch

    from rtdecoder.engines.onnx_export import ENGINE_META_NAME
    from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine
    from rtdecoder.engines.tensorrt import TensorRTEngine
    from rtdecoder.engines.torch_backend import TorchEngine

    found = [TorchEngine(model, subject)]
    if (folder / ENGINE_META_NAME).is_file():
        found.append(OnnxRuntimeEngine(folder))
        if (folder / "encoder.plan").is_file():
            found.append(TensorRTEngine(folder))
    if torch.cuda.is_available():
        found.append(TorchEngine(model, subject, device="cuda", compile=True))
    return found


def _build(args: argparse.Namespace) -> int:
    from rtdecoder.engines.onnx_export import export_onnx

    config, model, folder = _setup(args)
    export_onnx(model, args.subject, folder, opset=config.generator.onnx_opset)
    if args.backend == "tensorrt":
        from rtdecoder.engines.tensorrt import build_tensorrt_engines

        build_tensorrt_engines(folder, config.generator.max_batch, config.generator.tensorrt_fp16)
    print(f"engines written to {folder}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.decode.engine import compare_engines

    _, model, folder = _setup(args)
    engines = _engines(model, args.subject, folder)
    betas = torch.randn(2, model.adapters[args.subject].in_features, generator=torch.Generator().manual_seed(0))
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

    _, model, folder = _setup(args)
    steps = args.steps or model.config.prior_sample_steps
    betas = torch.randn(1, model.adapters[args.subject].in_features)
    print(f"{'backend':24s} {'steps':>5s} {'median ms':>10s} {'p95 ms':>8s}")
    for engine in _engines(model, args.subject, folder):
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
