"""Write ``fixture.safetensors``: outputs of the released MindEyeV2 network at a tiny size.

The importer tests (``tests/test_import_mindeye2.py``) rebuild the same weights from the seed and
the key manifest stored here, import them, and compare our outputs with the reference's. Run by
hand, in an environment that has the reference code; it is not part of the test suite::

    pip install dalle2-pytorch==1.15.6 rotary-embedding-torch==0.9.1   # and their dependencies
    python tests/data/mindeye2_reference/make_fixture.py --mindeye2-src MindEyeV2/src

``--mindeye2-src`` is the ``src`` folder of a MindEyeV2 checkout (its ``models.py`` defines
``BrainNetwork``, ``PriorNetwork`` and ``BrainDiffusionPrior``). Its ``utils`` module needs the
Stability ``generative_models`` tree, and nothing we call uses it, so an empty module stands in.

The network is built as the reference's training notebook builds it (sequence length 1, blurry
head on, prior with ``learned_query_mode="pos_emb"``, no causal mask, continuous time embedding,
100 cosine timesteps, condition dropout 0.2), at sizes small enough to rebuild in a test:
hidden 16, 4 tokens of width 40, prior depth 2 with 2 heads of 36 (so the 32-wide rotary
embedding covers only part of each head, as at the paper's 52).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
HIDDEN, N_TOKENS, TOKEN_DIM, VOXELS = 16, 4, 40, (11, 7)
PRIOR_DEPTH, PRIOR_HEADS, PRIOR_DIM_HEAD, TIMESTEPS = 2, 2, 36, 100
SEED = 20240311
FIXED = ("rotary_emb.freqs", "noise_scheduler.")


def build_reference(models: types.ModuleType) -> nn.Module:
    """The released module tree: ``ridge``, ``backbone``, ``diffusion_prior``."""
    model = nn.Module()
    model.ridge = nn.Module()
    model.ridge.linears = nn.ModuleList(nn.Linear(v, HIDDEN) for v in VOXELS)
    model.backbone = models.BrainNetwork(
        h=HIDDEN, in_dim=VOXELS[0], out_dim=N_TOKENS * TOKEN_DIM, seq_len=1, n_blocks=2, drop=0.15,
        clip_size=TOKEN_DIM, blurry_recon=True, clip_scale=1,
    )
    net = models.PriorNetwork(
        dim=TOKEN_DIM, depth=PRIOR_DEPTH, dim_head=PRIOR_DIM_HEAD, heads=PRIOR_HEADS, causal=False,
        num_tokens=N_TOKENS, learned_query_mode="pos_emb",
    )
    model.diffusion_prior = models.BrainDiffusionPrior(
        net=net, image_embed_dim=TOKEN_DIM, condition_on_text_encodings=False, timesteps=TIMESTEPS,
        cond_drop_prob=0.2, image_embed_scale=None,
    )
    return model.eval()


def manifest_of(model: nn.Module) -> dict[str, list]:
    manifest = {}
    for key, value in model.state_dict().items():
        if any(part in key for part in FIXED):
            kind = "fixed"
        elif value.ndim == 1 and bool((value == 1).all()):
            kind = "gain"
        elif value.ndim == 1:
            kind = "bias"
        else:
            kind = "weight"
        manifest[key] = [list(value.shape), kind]
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mindeye2-src", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=HERE / "fixture.safetensors")
    args = parser.parse_args()
    sys.modules.setdefault("utils", types.ModuleType("utils"))
    sys.path.insert(0, str(args.mindeye2_src))
    sys.path.insert(0, str(HERE.parents[1]))  # tests/
    sys.path.insert(0, str(HERE.parents[2]))  # the repository
    import models  # the reference's models.py
    from test_import_mindeye2 import seeded_reference_weights

    torch.manual_seed(0)
    model = build_reference(models)
    manifest = manifest_of(model)
    state = model.state_dict()
    fixed = {k: state[k].clone() for k, (_, kind) in manifest.items() if kind == "fixed"}
    model.load_state_dict({**seeded_reference_weights(manifest, SEED), **fixed})

    g = torch.Generator().manual_seed(1)
    betas = torch.randn(3, VOXELS[1], generator=g)
    noisy = torch.randn(3, N_TOKENS, TOKEN_DIM, generator=g)
    times = torch.tensor([0, 37, 99])
    prior = model.diffusion_prior
    with torch.no_grad():
        hidden = model.ridge.linears[1](betas)[:, None, :]  # (B, seq_len=1, H)
        backbone, clip_tokens, (blurry, _) = model.backbone(hidden)
        denoised = prior.net(noisy, times, brain_embed=backbone)
        denoised_null = prior.net(noisy, times, brain_embed=backbone, brain_cond_drop_prob=1.0,
                                  image_cond_drop_prob=1.0)
        torch.manual_seed(7)
        sampled = prior.p_sample_loop(backbone.shape, text_cond=dict(text_embed=backbone), cond_scale=1.0,
                                      timesteps=20)
        torch.manual_seed(8)
        sampled_7 = prior.p_sample_loop(backbone.shape, text_cond=dict(text_embed=backbone), cond_scale=1.0,
                                        timesteps=7)
    tensors = {
        **{f"fixed/{k}": v.contiguous() for k, v in fixed.items()},
        "input/betas_subject1": betas, "input/noisy": noisy, "input/times": times,
        "output/backbone": backbone, "output/clip_tokens": clip_tokens, "output/blurry_latent": blurry,
        "output/denoised": denoised, "output/denoised_null": denoised_null,
        "output/sampled_seed7_steps20": sampled, "output/sampled_seed8_steps7": sampled_7,
    }
    metadata = {
        "manifest": json.dumps(manifest), "seed": str(SEED),
        "sizes": json.dumps({"hidden": HIDDEN, "n_tokens": N_TOKENS, "token_dim": TOKEN_DIM, "voxels": VOXELS,
                             "prior_depth": PRIOR_DEPTH, "prior_heads": PRIOR_HEADS,
                             "prior_dim_head": PRIOR_DIM_HEAD, "timesteps": TIMESTEPS}),
    }
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(args.out), metadata=metadata)
    print(f"wrote {args.out}: {len(manifest)} keys, {sum(v.numel() for v in tensors.values())} stored values")


if __name__ == "__main__":
    main()
