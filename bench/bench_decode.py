"""Decode latency on the phantom preset: beta -> tokens -> prior -> image, per backend and step count.

Prints a table (median and p95 over ``--repeats`` decodes of one trial) and writes JSON to
``bench/results/bench_decode.json``. The MindEye2 model has random weights at the phantom sizes
(latency does not depend on the values), as many models as the preset decodes together
(``training.ensemble_size``, :class:`~rtdecoder.decode.ensemble.ModelEnsemble`; ``--models`` to
change it); the phantom generator is the trained teacher/student
from ``rtdecoder engines train-generator`` when its cache exists, otherwise an untrained network
of the same size (marked so in the table). With trained generators, ``--quality`` also reports
teacher vs student two-way identification (EfficientNet-Lite0 pooled features), PixCorr and SSIM
on the held-out stimuli, reconstructing from their true tokens.

Usage: python bench/bench_decode.py [--repeats 30] [--threads 2] [--models N] [--quality]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TARGET_MS = 250.0


def _generators(config):
    from rtdecoder.phantom.generator import (
        WEIGHTS_NAME,
        PhantomGenerator,
        PhantomGeneratorNet,
        load_phantom_net,
        phantom_weights_folder,
    )

    gen = config.generator
    found = {}
    for role, steps in (("teacher", gen.n_steps), ("student", gen.student_steps)):
        folder = phantom_weights_folder(config, role)
        if (folder / WEIGHTS_NAME).is_file():
            found[role] = (PhantomGenerator(load_phantom_net(folder), f"phantom-{role}"), steps, True)
        else:
            net = PhantomGeneratorNet(config.model.n_tokens, config.model.token_dim, gen.image_size_px,
                                      gen.phantom_cross_dim)
            found[role] = (PhantomGenerator(net, f"phantom-{role}"), steps, False)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", type=int, help="models decoded together (default: the preset's "
                        "training.ensemble_size)")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--out", default="bench/results/bench_decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rtdecoder.config import load_config
    from rtdecoder.decode.engine import sample_prior
    from rtdecoder.decode.ensemble import as_model
    from rtdecoder.decode.model import MindEye2
    from rtdecoder.engines.onnx_export import export_onnx
    from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine
    from rtdecoder.engines.torch_backend import TorchEngine

    config = load_config("phantom")
    n_models = args.models or config.training.ensemble_size
    members = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        members.append(MindEye2(config.model, {"sub-01": config.phantom.n_voxels}).eval())
    model = as_model(members).eval()
    betas = torch.randn(1, config.phantom.n_voxels)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_engine = OnnxRuntimeEngine(export_onnx(model, "sub-01", tmp), n_threads=args.threads)
        engines = [TorchEngine(model, "sub-01"), onnx_engine]
        generators = _generators(config)
        rows = []
        for engine in engines:
            for generator, gen_steps, trained in generators.values():
                prior_steps = config.model.prior_sample_steps
                times = {"tokens": [], "prior": [], "image": [], "total": []}
                for i in range(args.repeats + 2):
                    t0 = time.perf_counter()
                    out = engine.encode(betas)
                    t1 = time.perf_counter()
                    tokens = sample_prior(engine, out.backbone_tokens, prior_steps, seed=i)
                    t2 = time.perf_counter()
                    generator.generate(tokens, gen_steps, seed=i)
                    t3 = time.perf_counter()
                    if i >= 2:
                        stages = (("tokens", t1 - t0), ("prior", t2 - t1), ("image", t3 - t2), ("total", t3 - t0))
                        for key, dt in stages:
                            times[key].append(1000 * dt)
                row = {"backend": engine.name, "generator": generator.name + ("" if trained else " (untrained)"),
                       "models": n_models, "prior_steps": prior_steps, "image_steps": gen_steps}
                for key, values in times.items():
                    row[f"{key}_median_ms"] = float(np.median(values))
                    row[f"{key}_p95_ms"] = float(np.percentile(values, 95))
                rows.append(row)
    print(f"phantom preset, {n_models} model(s) decoded together, {args.threads} threads, {args.repeats} decodes; "
          f"target total <= {TARGET_MS:.0f} ms")
    print(f"{'backend':20s} {'generator':28s} {'prior':>5s} {'img':>4s} {'tokens':>7s} {'prior':>7s} "
          f"{'image':>7s} {'total':>7s} {'p95':>7s}")
    for r in rows:
        print(f"{r['backend']:20s} {r['generator']:28s} {r['prior_steps']:5d} {r['image_steps']:4d} "
              f"{r['tokens_median_ms']:7.1f} {r['prior_median_ms']:7.1f} {r['image_median_ms']:7.1f} "
              f"{r['total_median_ms']:7.1f} {r['total_p95_ms']:7.1f}")
    result = {"rows": rows, "models": n_models, "threads": args.threads, "repeats": args.repeats,
              "target_ms": TARGET_MS}
    if args.quality:
        result["quality"] = _quality(config, generators)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _quality(config, generators) -> list[dict]:
    from rtdecoder.decode.image_metrics import reconstruction_metrics
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.phantom.generator import phantom_split, phantom_training_data

    if not all(trained for _, _, trained in generators.values()):
        raise SystemExit("--quality needs trained generators: run 'rtdecoder engines train-generator' first")
    _, test_idx = phantom_split(config.phantom.n_stimuli)
    images, tokens = phantom_training_data(config, test_idx, progress=False)
    embedder = make_embedder(config.embedding)
    rows = []
    print(f"{'generator':18s} {'steps':>5s} {'two-way':>8s} {'PixCorr':>8s} {'SSIM':>6s} {'ms/image':>9s}")
    for generator, steps, _ in generators.values():
        start = time.perf_counter()
        recon = np.concatenate([generator.generate(tokens[i:i + 16], steps, seed=i) for i in range(0, len(tokens), 16)])
        ms = 1000 * (time.perf_counter() - start) / len(tokens)
        metrics = reconstruction_metrics(images, recon, lambda im: embedder.embed(im).pooled)
        rows.append({"generator": generator.name, "steps": steps, "ms_per_image": ms, **metrics})
        print(f"{generator.name:18s} {steps:5d} {metrics['two_way']:8.3f} {metrics['pixcorr']:8.3f} "
              f"{metrics['ssim']:6.3f} {ms:9.1f}")
    return rows


if __name__ == "__main__":
    main()
