"""Tests of the training loop: multi-subject steps, exact resume, DDP equivalence, fine-tuning."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rtdecoder.calibration.train import SubjectDataset, finetune, train
from rtdecoder.config import ModelConfig, TrainingConfig
from rtdecoder.decode.model import MindEye2
from rtdecoder.errors import BundleError, ConfigError

VOXELS = {"s1": 12, "s2": 9}


def tiny_model(seed: int = 0, **overrides) -> MindEye2:
    values = dict(hidden_dim=32, n_blocks=2, dropout=0.1, n_tokens=4, token_dim=16, prior_dim=16,
                  prior_depth=1, prior_heads=2, prior_timesteps=10)
    values.update(overrides)
    torch.manual_seed(seed)
    return MindEye2(ModelConfig(**values), VOXELS)


def datasets(n_trials: int = 16, lowlevel: bool = False) -> dict[str, SubjectDataset]:
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(40, 4, 16, generator=gen)
    out = {}
    for subject_id, n_voxels in VOXELS.items():
        index = torch.randint(0, 40, (n_trials,), generator=gen)
        encoder = torch.randn(64, n_voxels, generator=gen)
        betas = images[index].flatten(1) @ encoder / 8 + 0.5 * torch.randn(n_trials, n_voxels, generator=gen)
        low = torch.randn(n_trials, 3, 7, 7, generator=gen) if lowlevel else None
        out[subject_id] = SubjectDataset(subject_id, betas, images[index], index, low)
    return out


def recipe(**overrides) -> TrainingConfig:
    values = dict(epochs=2, batch_size=8, lr=1e-3, mixco_fraction=0.5, warmup_epochs=0.5, seed=3)
    values.update(overrides)
    return TrainingConfig(**values)


def test_training_runs_both_loss_phases_and_saves_model(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, datasets(), recipe(), tmp_path, progress=False)
    assert result.global_step == 8 and result.epoch == 2  # 16 trials / 4 per subject per step
    assert all(torch.isfinite(torch.tensor(m["total"])) for m in result.losses)
    assert all(m["prior"] > 0 and m["clip"] > 0 for m in result.losses)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("adapters.s2") for k in changed)
    assert any(k.startswith("blocks.1") for k in changed)
    assert any(k.startswith("prior.") for k in changed)
    loaded = MindEye2.from_pretrained(result.model_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_lowlevel_head_trains_with_targets(tmp_path):
    model = tiny_model(lowlevel=True, lowlevel_channels=3, lowlevel_upsamples=0, use_prior=False)
    result = train(model, datasets(lowlevel=True), recipe(epochs=1), tmp_path, progress=False)
    assert all(m["lowlevel"] > 0 for m in result.losses)
    # Without targets (a released checkpoint calibrated on a lab's images) the head is kept as trained.
    head = {k: v.clone() for k, v in model.lowlevel_head.state_dict().items()}
    result = train(model, datasets(), recipe(epochs=1), tmp_path / "b", progress=False)
    assert all(m["lowlevel"] == 0 for m in result.losses)
    assert all(torch.equal(v, head[k]) for k, v in model.lowlevel_head.state_dict().items())


def test_released_architecture_fine_tunes(tmp_path):
    """An imported model (dalle2 prior, VAE low-level decoder) trains with the same loop."""
    model = tiny_model(n_blocks=0, prior_network="dalle2", prior_dim_head=8, lowlevel=True, lowlevel_decoder="vae",
                       lowlevel_channels=3, lowlevel_upsamples=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, datasets(lowlevel=True), recipe(epochs=1), tmp_path, progress=False)
    assert all(m["prior"] > 0 and m["lowlevel"] > 0 for m in result.losses)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # both null embeddings get gradient: brain and image tokens are each dropped at prior_cond_drop
    assert {"prior.null_brain", "prior.null_image", "prior.blocks.0.to_kv.weight"} <= changed
    assert any(k.startswith("lowlevel_head.decoder.") for k in changed)


def test_resume_is_exact(tmp_path):
    full = tiny_model()
    train(full, datasets(), recipe(), tmp_path / "full", progress=False)

    part = tiny_model()
    first = train(part, datasets(), recipe(), tmp_path / "part", progress=False, stop_after_steps=3)
    assert first.global_step == 3 and not first.model_dir.exists()
    resumed_model = tiny_model(seed=99)  # different initial weights: all must come from the checkpoint
    second = train(resumed_model, datasets(), recipe(), tmp_path / "part", resume=True, progress=False)
    assert second.global_step == 8 and len(second.losses) == 8
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def test_resume_without_checkpoint_and_bad_inputs_are_errors(tmp_path):
    with pytest.raises(BundleError, match="no checkpoint to resume from"):
        train(tiny_model(), datasets(), recipe(), tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="at least 2 trials per subject"):
        train(tiny_model(), datasets(), recipe(batch_size=2), tmp_path, progress=False)
    data = datasets()
    data["s3"] = SubjectDataset("s3", torch.zeros(8, 5), torch.zeros(8, 4, 16), torch.zeros(8))
    with pytest.raises(ConfigError, match="no adapter for 's3'; call model.add_subject"):
        train(tiny_model(), data, recipe(), tmp_path, progress=False)
    with pytest.raises(BundleError, match=r"targets: expected shape \(8, T, D\)"):
        SubjectDataset("s3", torch.zeros(8, 5), torch.zeros(7, 4, 16), torch.zeros(8))


def test_finetune_adds_fresh_adapter_for_new_voxel_count(tmp_path):
    pretrained = tiny_model()
    train(pretrained, datasets(), recipe(epochs=1), tmp_path / "pre", progress=False)
    gen = torch.Generator().manual_seed(5)
    new = SubjectDataset("s9", torch.randn(12, 20, generator=gen), torch.randn(12, 4, 16, generator=gen),
                         torch.arange(12))
    model, result = finetune(tmp_path / "pre" / "model", new, recipe(epochs=4), tmp_path / "ft",
                             progress=False)
    assert model.subjects == {"s9": 20}
    assert result.global_step == 4  # 12 trials // 8 per step, 4 epochs
    assert not torch.equal(model.token_proj.weight, pretrained.token_proj.weight)
    assert MindEye2.from_pretrained(result.model_dir).subjects == {"s9": 20}


def test_finetune_is_reproducible_whatever_ran_before(tmp_path):
    pretrained = tiny_model()
    pretrained.save_pretrained(tmp_path / "pretrained")
    ds = datasets()["s2"]
    first, _ = finetune(tmp_path / "pretrained", ds, recipe(epochs=2), tmp_path / "a", progress=False)
    torch.randn(1000)  # the process's global generator moves on between calibrations
    second, _ = finetune(tmp_path / "pretrained", ds, recipe(epochs=2), tmp_path / "b", progress=False)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_finetune_shared_lr_scale_slows_only_the_pretrained_weights(tmp_path):
    pretrained = tiny_model(dropout=0.0)
    train(pretrained, datasets(), recipe(epochs=1), tmp_path / "pre", progress=False)
    gen = torch.Generator().manual_seed(5)
    new = SubjectDataset("s9", torch.randn(16, 20, generator=gen), torch.randn(16, 4, 16, generator=gen),
                         torch.arange(16))
    moved = {}
    for scale in (1.0, 0.01):
        model, _ = finetune(tmp_path / "pre" / "model", new, recipe(epochs=3, finetune_shared_lr_scale=scale),
                            tmp_path / f"ft-{scale}", progress=False)
        torch.manual_seed(0)
        fresh = MindEye2.from_pretrained(tmp_path / "pre" / "model")
        moved[scale] = (
            (model.token_proj.weight - fresh.token_proj.weight).abs().mean().item(),
            model.adapters["s9"].weight.abs().mean().item(),
        )
    # Adam steps scale with the learning rate: the shared weights move ~100x less, the adapter as much
    assert moved[0.01][0] < 0.05 * moved[1.0][0]
    assert moved[0.01][1] == pytest.approx(moved[1.0][1], rel=0.5)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model(dropout=0.0)
        train(model, datasets(n_trials=8), recipe(), out_dir, progress=False)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    single = tiny_model(dropout=0.0)
    train(single, datasets(n_trials=8), recipe(), tmp_path / "one", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = MindEye2.from_pretrained(tmp_path / "ddp" / "model")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_live_betas_stand_in_for_their_own_trial_only():
    n, v = 10, 3
    betas = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, v)  # row i is all i
    live_rows = torch.tensor([4, 2, 4, 7, 4])  # trial 4 has three live betas, 2 and 7 one each
    live = 100 + 10 * live_rows[:, None].float().repeat(1, v) + torch.arange(5.0)[:, None]
    ds = SubjectDataset("s1", betas, torch.zeros(n, 1, 2), torch.arange(n), live_betas=live, live_rows=live_rows)
    rows = torch.arange(n).repeat(20)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(ds.batch_betas(rows, 0.0, gen), betas[rows])
    drawn = ds.batch_betas(rows, 1.0, gen)
    for row, x in zip(rows.tolist(), drawn, strict=True):
        if row in (2, 4, 7):  # always one of its own live betas
            assert int(x[0]) // 10 == 10 + row
        else:  # no live beta: its final one
            assert torch.equal(x, betas[row])
    assert {float(x[0]) for row, x in zip(rows.tolist(), drawn, strict=True) if row == 4} == {140.0, 142.0, 144.0}
    half = ds.batch_betas(torch.full((400,), 4), 0.5, torch.Generator().manual_seed(1))
    assert 150 < int((half[:, 0] >= 100).sum()) < 250
    with pytest.raises(BundleError, match="live_rows: expected trial rows in"):
        SubjectDataset("s1", betas, torch.zeros(n, 1, 2), torch.arange(n), live_betas=live[:1],
                       live_rows=torch.tensor([n]))
    with pytest.raises(BundleError, match="live_betas and live_rows"):
        SubjectDataset("s1", betas, torch.zeros(n, 1, 2), torch.arange(n), live_betas=live)


def test_live_betas_change_training_only_when_drawn(tmp_path):
    base = datasets()["s2"]
    noisy = base.betas + torch.randn(base.betas.shape, generator=torch.Generator().manual_seed(5))
    with_live = SubjectDataset("s2", base.betas, base.targets, base.image_index, live_betas=noisy,
                               live_rows=torch.arange(len(base)))
    states = []
    for ds, fraction in ((base, 0.0), (with_live, 0.0), (with_live, 0.5)):
        model = tiny_model()
        train(model, {"s1": datasets()["s1"], "s2": ds}, recipe(live_beta_fraction=fraction),
              tmp_path / str(len(states)), progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["adapters.s2.weight"], states[2]["adapters.s2.weight"])
