"""Where reconstruction quality goes: the generator, the prior and the retrieval head, apart.

For a phantom subject's bundle, the calibration session's test trials (``BUNDLE/betas``, never
trained on), repeats averaged, go through the bundle's model as the live decoder sends them:
z-scored with the bundle's statistics, then the backbone, the retrieval head and the diffusion
prior (``model.prior_sample_steps``, ``prior_sample_eta``). Each set of tokens is scored against
the true tokens of the shown images (top-1 among the test images and two-way identification, in
token space), and the phantom generator (the distilled student, as ``run`` uses) draws images from
the true tokens and from the prior's, scored against the shown images with
:func:`rtdecoder.decode.image_metrics.reconstruction_metrics`. Images from the true tokens are
the generator's ceiling; the gap from there to the prior's images is the prior's.

Prints a table and writes JSON (default ``bench/results/reconstruction.json``).

Usage: python bench/bench_reconstruction.py --bundle rtdecoder-demo/bundle [--images 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a phantom subject's bundle (rtdecoder demo or calibrate)")
    parser.add_argument("--images", type=int, default=100, help="test images reconstructed (default 100)")
    parser.add_argument("--out", default="bench/results/reconstruction.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.calibration.dataset import read_subject_betas
    from rtdecoder.decode.image_metrics import reconstruction_metrics, two_way_identification
    from rtdecoder.decode.metrics import mean_over_repeats, retrieval_top1
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.phantom.distill import load_or_distill_phantom_student
    from rtdecoder.phantom.world import PhantomWorld

    bundle = SubjectBundle.load(args.bundle)
    config = bundle.config
    world = PhantomWorld(config, progress=False)
    calibration = read_subject_betas(Path(args.bundle) / "betas")
    test = calibration.is_test
    stim_ids, betas = mean_over_repeats(calibration.betas[test], calibration.stim_id[test])
    rows = np.array([world.bank.index_of(str(s)) for s in stim_ids])
    true = torch.from_numpy(world.embedding.tokens[rows]).float()
    z = torch.from_numpy((betas - bundle.beta_mean) / bundle.beta_std).float()

    model = bundle.load_model().eval()
    with torch.no_grad():
        out = model({bundle.subject_id: z})
        prior = model.prior.sample(out.backbone_tokens, config.model.prior_sample_steps,
                                   config.model.prior_sample_eta, torch.Generator().manual_seed(0))
    tokens = {"retrieval head": out.clip_tokens, "backbone": out.backbone_tokens, "prior": prior}
    result: dict = {"bundle": str(args.bundle), "n_test_images": len(stim_ids),
                    "prior_sample_steps": config.model.prior_sample_steps, "tokens": {}, "images": {}}
    for name, predicted in tokens.items():
        result["tokens"][name] = {
            "top1": retrieval_top1(predicted, true, pool_size=len(true)).image,  # one pool: all test images
            "two_way": two_way_identification(true.flatten(1).numpy(), predicted.flatten(1).numpy()),
            "cosine_to_true_mean": float(torch.nn.functional.cosine_similarity(predicted.flatten(1),
                                                                               true.flatten(1)).mean()),
        }

    generator = load_or_distill_phantom_student(config)
    steps = config.generator.student_steps
    embedder = make_embedder(config.embedding)
    n = min(args.images, len(stim_ids))
    shown = np.stack([world.bank.image(int(r)) for r in rows[:n]]).astype(np.uint8)
    for name, source in (("from the true tokens", true), ("from the prior's tokens", prior)):
        # one image per call, seeded by its row, as the live decoder draws each trial's
        images = np.concatenate([generator.generate(source[j:j + 1], steps, seed=j) for j in range(n)])
        result["images"][name] = reconstruction_metrics(shown, images, lambda im: embedder.embed(im).pooled)

    print(f"{args.bundle}: {len(stim_ids)} test images of the calibration session, repeats averaged "
          f"(chance top-1 {100 / len(stim_ids):.2f}%, two-way 50%)")
    print(f"{'tokens':<26} {'top-1':>7} {'two-way':>8} {'cosine':>7}")
    for name, row in result["tokens"].items():
        print(f"{name:<26} {100 * row['top1']:6.1f}% {100 * row['two_way']:7.1f}% {row['cosine_to_true_mean']:7.3f}")
    print(f"{'images (' + str(n) + ')':<26} {'two-way':>8} {'PixCorr':>8} {'SSIM':>7}")
    for name, row in result["images"].items():
        print(f"{name:<26} {100 * row['two_way']:7.1f}% {row['pixcorr']:8.3f} {row['ssim']:7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
