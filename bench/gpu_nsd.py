"""GPU latency at the paper's (nsd preset) sizes, random weights: backbone + prior, unCLIP UNet.

Times, per configuration, eager vs ``torch.compile`` (CUDA graphs):

- encoder (adapter for 15724 voxels, hidden 4096, backbone, heads) + 20 DDIM prior steps
  (dim 1664, depth 6, 256 tokens), fp16;
- the SDXL unCLIP UNet (context 1664, 256 tokens) + SDXL VAE decode at 768 px for 1, 4 and 38
  Euler steps with guidance 5 (two UNet passes per step), fp16;
- the distilled unCLIP student (``rtdecoder engines distill-unclip``) + VAE decode at 768 px for
  1, 2 and 4 steps, unguided (guidance was folded in: one UNet pass per step), fp16. Its latency
  depends only on the architecture, so without ``--student`` the rows time the same random-weight
  UNet run as the student is run; ``--student DIR`` times a distilled folder itself;
- the caption stage: the map from the predicted tokens to GIT's image tokens and GIT's text decoder
  at GIT-large-COCO's sizes, greedy and beam 3, always the whole budget of 20 new tokens, fp16.

Prints a table and writes ``bench/results/gpu_nsd.json``. ``--tiny`` runs the same code path on the
CPU with tiny sizes and eager only (a dry run to check the script, not a measurement).

Usage: python bench/gpu_nsd.py [--tiny] [--repeats 5] [--student DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    for _ in range(2):
        fn()  # warm-up: compilation and CUDA-graph recording happen here
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with tiny sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/gpu_nsd.json")
    parser.add_argument("--student", default=None,
                        help="a distilled unCLIP student folder (generator.unclip_student_path) to time; "
                        "default: the random-weight UNet, run as the student is")
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from rtdecoder.config import ModelConfig, load_config
    from rtdecoder.decode.engine import sample_prior
    from rtdecoder.decode.generators.unclip import (
        UnclipGenerator,
        load_unclip_student,
        sdxl_unclip_unet_config,
        sdxl_vae_config,
    )
    from rtdecoder.engines.torch_backend import TorchEngine

    if args.tiny:
        torch.set_num_threads(1)
        device, dtype, compile_modes = torch.device("cpu"), torch.float32, [False]
        model_config = ModelConfig(hidden_dim=32, n_blocks=1, n_tokens=4, token_dim=16, prior_dim=16, prior_depth=1,
                                   prior_heads=2, lowlevel=True)
        n_voxels, image_px, unclip_steps, student_steps = 50, 64, [1, 2], [1, 2, 4]
        unet_config = dict(sdxl_unclip_unet_config(image_px, 16), block_out_channels=[32, 64], layers_per_block=1,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=1,
                           attention_head_dim=2, norm_num_groups=8, projection_class_embeddings_input_dim=1024)
        vae_config = dict(sdxl_vae_config(), block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_nsd.py needs a CUDA device; use --tiny for a CPU dry run")
        device, dtype, compile_modes = torch.device("cuda"), torch.float16, [False, True]
        model_config = load_config("nsd").model
        n_voxels, image_px, unclip_steps, student_steps = 15724, 768, [1, 4, 38], [1, 2, 4]
        unet_config, vae_config = sdxl_unclip_unet_config(image_px), sdxl_vae_config()

    from rtdecoder.decode.model import MindEye2

    rows = []
    torch.manual_seed(0)
    model = MindEye2(model_config, {"sub-01": n_voxels}).eval()
    betas = torch.randn(1, n_voxels)
    for compiled in compile_modes:
        engine = TorchEngine(model, "sub-01", device=device, compile=compiled, dtype=dtype)

        def decode_tokens(engine=engine):
            out = engine.encode(betas)
            return sample_prior(engine, out.backbone_tokens, model_config.prior_sample_steps, seed=0)

        median, p95 = _timed(decode_tokens, args.repeats, device)
        rows.append({"stage": "encoder + prior", "steps": model_config.prior_sample_steps,
                     "mode": "compiled" if compiled else "eager", "median_ms": median, "p95_ms": p95})
    del model, engine
    unet = UNet2DConditionModel(**unet_config).to(device, dtype).eval()
    vae = AutoencoderKL(**vae_config).to(device, dtype).eval()
    tokens = torch.randn(1, model_config.n_tokens, unet_config["cross_attention_dim"])
    if args.student:
        student = load_unclip_student(args.student, image_px, device=str(device), dtype=dtype)
        student_unet, student_vae = student.unet.eval(), student.vae.eval()
    else:  # the student has the teacher's architecture; only one UNet pass per step (no guidance) differs
        student_unet, student_vae = unet, vae
    for compiled in compile_modes:
        if compiled:
            unet = torch.compile(unet, mode="reduce-overhead", dynamic=False)
            student_unet = unet if not args.student else torch.compile(student_unet, mode="reduce-overhead",
                                                                          dynamic=False)
        generator = UnclipGenerator(unet, vae, image_size_px=image_px, guidance_scale=5.0)
        for steps in unclip_steps:
            median, p95 = _timed(lambda s=steps, g=generator: g.generate(tokens, s, seed=0), args.repeats, device)
            rows.append({"stage": f"unCLIP UNet + VAE {image_px}px", "steps": steps,
                         "mode": "compiled" if compiled else "eager", "median_ms": median, "p95_ms": p95})
        student_generator = UnclipGenerator(student_unet, student_vae, image_size_px=image_px, guidance_scale=1.0,
                                            name="unclip-student")
        for steps in student_steps:
            median, p95 = _timed(lambda s=steps, g=student_generator: g.generate(tokens, s, seed=0), args.repeats,
                                 device)
            rows.append({"stage": f"unCLIP student + VAE {image_px}px", "steps": steps,
                         "mode": "compiled" if compiled else "eager", "median_ms": median, "p95_ms": p95})
    rows += _caption_rows(args, model_config, device, dtype, tokens)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny dry run)"
    print(f"device: {name}; dtype {dtype}")
    print(f"{'stage':32s} {'steps':>5s} {'mode':>9s} {'median ms':>10s} {'p95 ms':>8s}")
    for r in rows:
        print(f"{r['stage']:32s} {r['steps']:5d} {r['mode']:>9s} {r['median_ms']:10.1f} {r['p95_ms']:8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "tiny": args.tiny, "rows": rows}, indent=2) + "\n")


class _NoEndTokenizer:
    """A tokenizer stand-in with no end token: every caption runs its whole token budget (the worst case)."""

    cls_token_id, sep_token_id, pad_token_id = 101, None, 0


def _caption_rows(args, model_config, device, dtype, tokens) -> list[dict]:
    """The caption stage: the map to GIT's image tokens and GIT's text decoder at GIT-large-COCO's sizes
    (random weights: the time depends on the sizes), greedy and beam 3, 20 new tokens."""
    from transformers import GitConfig, GitForCausalLM

    from rtdecoder.decode.caption import CaptionMap, GitCaptioner

    if args.tiny:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        vision = dict(hidden_size=16, image_size=28, patch_size=14, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32)
    else:
        text = dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072)
        vision = dict(hidden_size=1024, image_size=224, patch_size=14, num_hidden_layers=1, num_attention_heads=16,
                      intermediate_size=4096)  # the vision tower is bypassed: its depth does not matter
    config = GitConfig(vision_config=vision, vocab_size=30522, eos_token_id=None, **text)
    torch.manual_seed(0)
    git = GitForCausalLM(config)
    n_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    caption_map = CaptionMap((model_config.n_tokens, tokens.shape[-1]), (n_image_tokens, vision["hidden_size"]))
    rows = []
    for beams in (1, 3):
        captioner = GitCaptioner(git, _NoEndTokenizer(), caption_map, max_new_tokens=20, num_beams=beams).to(device)
        captioner.model.to(dtype)
        captioner.caption_map.to(dtype)
        median, p95 = _timed(lambda c=captioner: c.generate(tokens.to(device)), args.repeats, device)
        rows.append({"stage": f"caption map + GIT, {'greedy' if beams == 1 else f'beam {beams}'}", "steps": 20,
                     "mode": "eager", "median_ms": median, "p95_ms": p95})
    return rows


if __name__ == "__main__":
    main()
