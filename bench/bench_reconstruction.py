"""Where reconstruction quality goes: the generator, the prior and the retrieval head, apart.

Test trials never trained on, repeats averaged, go through a model as the live decoder sends
them: the backbone, the retrieval head and the diffusion prior (``model.prior_sample_steps``,
``prior_sample_eta``). Two sources of trials and model:

- ``--bundle B``: a phantom subject's bundle and its calibration session's test trials
  (``B/betas``), z-scored with the bundle's statistics;
- ``--pretrained DIR --subject sub-07``: a pretrained model (``DIR/config.json``, e.g.
  ``bench_calibration.py``'s ``pretrained/model``) and one of its pretraining subjects' simulated
  test-image trials (left out of pretraining), z-scored per session with that session's training
  trials as pretraining does: a development subject, for choices never made on the held-out one.

Each set of tokens is scored against the true tokens of the shown images (top-1 among the test
images and two-way identification, in token space), and the phantom generator (the distilled
student, as ``run`` uses) draws images from the true tokens and from the prior's, scored against
the shown images with :func:`rtdecoder.decode.image_metrics.reconstruction_metrics`. Images from
the true tokens are the generator's ceiling; the gap from there to the prior's images is the prior's.

``--guidance 1,2,5`` samples the prior with classifier-free guidance at those scales: each step's
prediction is ``null + scale * (brain - null)``, ``null`` the prediction with the prior's null
brain embedding (the one condition dropout trains); 1 is the plain sample ``run`` draws. Guidance
is measured here only; the runtime does not have it.

Prints a table and writes JSON (default ``bench/results/reconstruction.json``).

Usage::

    python bench/bench_reconstruction.py --bundle rtdecoder-demo/bundle [--images 100]
    python bench/bench_reconstruction.py --pretrained rtdecoder-cache/bench-calibration/pretrained/model \
        --subject sub-07 --guidance 1,2,5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="a phantom subject's bundle (rtdecoder demo or calibrate)")
    source.add_argument("--pretrained", help="a pretrained model folder; with --subject")
    parser.add_argument("--subject", help="with --pretrained: one of its phantom pretraining subjects, e.g. sub-07")
    parser.add_argument("--config", default="configs/phantom.yaml", help="with --pretrained: the world's config")
    parser.add_argument("--guidance", default="1", help="comma-separated guidance scales (default 1: none)")
    parser.add_argument("--images", type=int, default=100, help="test images reconstructed (default 100)")
    parser.add_argument("--out", default="bench/results/reconstruction.json")
    args = parser.parse_args()
    if (args.pretrained is None) != (args.subject is None):
        parser.error("--subject goes with --pretrained (and only with it)")
    scales = [float(s) for s in args.guidance.split(",")]
    torch.set_num_threads(2)

    from rtdecoder.decode.image_metrics import reconstruction_metrics, two_way_identification
    from rtdecoder.decode.metrics import retrieval_top1
    from rtdecoder.decode.prior import ddim_plan, ddim_sample
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.phantom.distill import load_or_distill_phantom_student

    config, world, model, subject_id, stim_ids, z = _bundle(args) if args.bundle else _pretrained(args)
    rows = np.array([world.bank.index_of(str(s)) for s in stim_ids])
    true = torch.from_numpy(world.embedding.tokens[rows]).float()
    prior = model.prior
    plan = ddim_plan(prior.alphas_cumprod, config.model.prior_sample_steps, config.model.prior_ddim_schedule,
                     config.model.prior_sample_eta)

    def sample(brain: torch.Tensor, scale: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        if scale == 1.0:  # the plain sample, as the runtime draws it
            return prior.sample(brain, config.model.prior_sample_steps, config.model.prior_sample_eta, generator)

        def guided(noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            x0 = prior.denoise(noisy, t, cond)
            null = prior.denoise(noisy, t, cond, torch.zeros(len(cond), dtype=torch.bool))
            return null + scale * (x0 - null)

        return ddim_sample(guided, brain, plan, config.model.prior_sample_eta,
                           lambda shape: torch.randn(shape, generator=generator))

    with torch.no_grad():
        out = model({subject_id: torch.from_numpy(z).float()})
        samples = {scale: sample(out.backbone_tokens, scale) for scale in scales}
    prior_name = {scale: "prior" if scale == 1.0 else f"prior, guidance {scale:g}" for scale in scales}
    tokens = {"retrieval head": out.clip_tokens, "backbone": out.backbone_tokens,
              **{prior_name[s]: samples[s] for s in scales}}
    result: dict = {"source": args.bundle or f"{args.pretrained} {args.subject}", "n_test_images": len(stim_ids),
                    "prior_sample_steps": config.model.prior_sample_steps, "guidance_scales": scales,
                    "tokens": {}, "images": {}}
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
    sources = {"from the true tokens": true, **{f"from the {prior_name[s]}'s tokens": samples[s] for s in scales}}
    for name, source_tokens in sources.items():
        # one image per call, seeded by its row, as the live decoder draws each trial's
        images = np.concatenate([generator.generate(source_tokens[j:j + 1], steps, seed=j) for j in range(n)])
        result["images"][name] = reconstruction_metrics(shown, images, lambda im: embedder.embed(im).pooled)

    print(f"{result['source']}: {len(stim_ids)} test images, repeats averaged "
          f"(chance top-1 {100 / len(stim_ids):.2f}%, two-way 50%)")
    print(f"{'tokens':<34} {'top-1':>7} {'two-way':>8} {'cosine':>7}")
    for name, row in result["tokens"].items():
        print(f"{name:<34} {100 * row['top1']:6.1f}% {100 * row['two_way']:7.1f}% {row['cosine_to_true_mean']:7.3f}")
    print(f"{'images (' + str(n) + ')':<34} {'two-way':>8} {'PixCorr':>8} {'SSIM':>7}")
    for name, row in result["images"].items():
        print(f"{name:<34} {100 * row['two_way']:7.1f}% {row['pixcorr']:8.3f} {row['ssim']:7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _bundle(args: argparse.Namespace):
    """The bundle's config, world, model and subject, its calibration's test images and their z-scored betas."""
    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.calibration.dataset import read_subject_betas
    from rtdecoder.decode.metrics import mean_over_repeats
    from rtdecoder.phantom.world import PhantomWorld

    bundle = SubjectBundle.load(args.bundle)
    calibration = read_subject_betas(Path(args.bundle) / "betas")
    test = calibration.is_test
    stim_ids, betas = mean_over_repeats(calibration.betas[test], calibration.stim_id[test])
    z = ((betas - bundle.beta_mean) / bundle.beta_std).astype(np.float32)
    world = PhantomWorld(bundle.config, progress=False)
    return bundle.config, world, bundle.load_model().eval(), bundle.subject_id, stim_ids, z


def _pretrained(args: argparse.Namespace):
    """The same for a pretraining subject: its simulated test-image trials, z-scored as pretraining does."""
    from rtdecoder.calibration.dataset import test_trial_betas
    from rtdecoder.calibration.pretrain import subject_index
    from rtdecoder.config import load_config
    from rtdecoder.decode.metrics import mean_over_repeats
    from rtdecoder.decode.model import MindEye2
    from rtdecoder.phantom.world import PhantomWorld

    config = load_config(args.config)
    world = PhantomWorld(config, progress=False)
    model = MindEye2.from_pretrained(args.pretrained).eval()
    if args.subject not in model.adapters:
        raise SystemExit(f"{args.pretrained}: --subject: no adapter for {args.subject!r}; have {list(model.adapters)}")
    subject = world.pretraining_source([subject_index(args.subject, world.n_subjects)]).load(progress=False)
    stim_ids, z_test = mean_over_repeats(*test_trial_betas(subject.subjects[args.subject]))
    return config, world, model, args.subject, stim_ids, z_test


if __name__ == "__main__":
    main()
