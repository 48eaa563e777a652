"""Progressive distillation of the unCLIP UNet at tiny SDXL-shaped sizes, on the CPU.

The quality test trains a tiny teacher for a few seconds as a diffusion model of toy latents (a
random-weight UNet's ODE is almost straight, so its few-step images are already close to its
many-step ones and there would be nothing to distil), then distils it for one round (4 -> 2 steps)
and measures, on held-out tokens and the same starting noise, how close the 2-step student and the
2-step teacher come to the teacher's 16-step images. ``pytest -s`` prints the table that
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdecoder.decode.generators import distill_unclip as du
from rtdecoder.decode.generators.unclip import UnclipGenerator, load_unclip_student, save_diffusers_folder
from rtdecoder.errors import BundleError, ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_generators import TINY_UNET, TINY_VAE  # noqa: E402

SIDE_PX = 16  # 2-level tiny VAE: 8x8 latents
SMALL_UNET = dict(TINY_UNET, block_out_channels=[16, 32], norm_num_groups=8)
N_TRAIN, N_HELD_OUT = 40, 8
QUALITY_MARGIN_DB = 1.0


def _unit_vae(images: np.ndarray, seed: int = 0):
    """A random tiny VAE rescaled so its latents spread about 1 between images, as SDXL's scaling factor makes them."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**dict(TINY_VAE, scaling_factor=1.0)).eval()
    spread = float(du.encode_latents(vae, images, SIDE_PX).std(0).mean())
    with torch.no_grad():  # scale the posterior mean up and the decoder's input down: the same images
        vae.encoder.conv_out.weight[:4] /= spread
        vae.encoder.conv_out.bias[:4] /= spread
        vae.decoder.conv_in.weight *= spread
    return vae


def _toy_world(n: int, token_dim: int = 16, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Two-colour gradients (16 px) and tokens that are a fixed linear map of their 6 colour values."""
    rng = np.random.default_rng(seed)
    left, right = rng.uniform(0, 255, (n, 1, 1, 3)), rng.uniform(0, 255, (n, 1, 1, 3))
    ramp = np.linspace(0, 1, SIDE_PX)[None, :, None, None]
    images = np.broadcast_to(left + (right - left) * ramp, (n, SIDE_PX, SIDE_PX, 3)).astype(np.uint8)
    colours = torch.from_numpy(np.concatenate([left, right], -1).reshape(n, 6) / 127.5 - 1).float()
    projection = torch.randn(6, 5 * token_dim, generator=torch.Generator().manual_seed(1))
    return np.ascontiguousarray(images), (colours @ projection).reshape(n, 5, token_dim) / 2


def _train_teacher(latents: torch.Tensor, tokens: torch.Tensor, n_iterations: int = 100, seed: int = 0):
    """A tiny unCLIP-shaped UNet trained as an epsilon-prediction diffusion model (SDXL schedule, Euler form)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SMALL_UNET).train()
    schedule = EulerDiscreteScheduler(**du.sdxl_scheduler_config())
    sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_iterations):
        rows = torch.randint(0, len(latents), (16,), generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        noise = torch.randn(latents[rows].shape, generator=g)
        context = tokens[rows].clone()
        drop = torch.rand(16, generator=g) < 0.1  # random-noise tokens as the unconditional context, as MindEye2
        context[drop] = torch.randn(context[drop].shape, generator=g)
        z = latents[rows] + sigmas[t][:, None, None, None] * noise
        loss = ((du.unet_epsilon(unet, z, sigmas[t], t.float(), context, SIDE_PX) - noise) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return unet.eval().requires_grad_(False)


def _random_unet(seed: int = 0, **changes):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(SMALL_UNET, **changes)).eval()


# --- The target and the grid. ---


def test_student_grid_is_every_other_point_of_the_teacher_grid() -> None:
    for student_steps in (1, 2, 4):
        t_student, s_student = du.euler_grid(student_steps)
        t_teacher, s_teacher = du.euler_grid(2 * student_steps)
        torch.testing.assert_close(t_teacher[::2], t_student)
        torch.testing.assert_close(s_teacher[::2], s_student)


def test_one_student_step_with_the_target_lands_where_two_guided_teacher_steps_do() -> None:
    teacher = _random_unet()
    g = torch.Generator().manual_seed(3)
    timesteps, sigmas = du.euler_grid(4)
    index = torch.tensor([0, 2])
    z = torch.randn(2, 4, 8, 8, generator=g) * sigmas[index][:, None, None, None]
    context, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    eps = du.distillation_target(teacher, z, index, timesteps, sigmas, context, uncond, 3.0, SIDE_PX)
    one_step = z + (sigmas[index + 2] - sigmas[index])[:, None, None, None] * eps
    two_steps = du.teacher_two_steps(teacher, z, index, timesteps, sigmas, context, uncond, 3.0, SIDE_PX)
    torch.testing.assert_close(one_step, two_steps, rtol=1e-5, atol=1e-5)
    unguided = du.teacher_two_steps(teacher, z, index, timesteps, sigmas, context, uncond, 1.0, SIDE_PX)
    assert not torch.allclose(unguided, two_steps)  # the guidance is in the target


def test_plan_needs_halving_rounds() -> None:
    plan = du.DistillPlan(32, 4, 10, 2, 1e-4, 5.0, 768)
    assert plan.rounds == [16, 8, 4]
    for teacher_steps, student_steps in ((38, 4), (4, 4), (12, 4)):
        with pytest.raises(ConfigError, match="unclip_distill_teacher_steps / generator.student_steps"):
            du.DistillPlan(teacher_steps, student_steps, 10, 2, 1e-4, 5.0, 768)


# --- Quality: the 2-step student against the 2-step teacher, both against the 16-step teacher. ---


@pytest.mark.slow
def test_two_step_student_is_closer_to_the_many_step_teacher_than_the_two_step_teacher(tmp_path) -> None:
    torch.set_num_threads(1)
    images, tokens = _toy_world(N_TRAIN + N_HELD_OUT)
    vae = _unit_vae(images)
    latents = du.encode_latents(vae, images, SIDE_PX)
    teacher = _train_teacher(latents[:N_TRAIN], tokens[:N_TRAIN])
    plan = du.DistillPlan(teacher_steps=4, student_steps=2, iterations_per_round=60, batch_size=8, lr=1e-3,
                          guidance_scale=1.0, image_size_px=SIDE_PX)
    student = du.progressive_distill_unclip(teacher, latents[:N_TRAIN], tokens[:N_TRAIN], plan, tmp_path,
                                            checkpoint_every=1000, progress=False)
    rows = du.compare_with_teacher(UnclipGenerator(teacher, vae, SIDE_PX, 1.0),
                                   UnclipGenerator(student, vae, SIDE_PX, 1.0), tokens[N_TRAIN:],
                                   reference_steps=16, steps=[1, 2, 4])
    print("\nheld-out tokens: 8; reference: the teacher at 16 steps\n" + du.format_comparison(rows))
    psnr = {(r["generator"], r["steps"]): r["psnr_db"] for r in rows}
    assert psnr[("student", 2)] > psnr[("teacher", 2)] + QUALITY_MARGIN_DB
    assert psnr[("student", 1)] > psnr[("teacher", 1)]


# --- Checkpoints: a run stopped between checkpoints resumes and ends where an unstopped one does. ---


class _KilledError(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    images, tokens = _toy_world(6)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = du.DistillPlan(teacher_steps=8, student_steps=2, iterations_per_round=5, batch_size=2, lr=1e-3,
                          guidance_scale=2.0, image_size_px=SIDE_PX)
    teacher = _random_unet()
    whole = du.progressive_distill_unclip(teacher, latents, tokens, plan, tmp_path / "whole", checkpoint_every=2,
                                          progress=False)

    real_step, calls = du.distil_step, []

    def dies_at_the_eighth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # round 2, iteration 3: the last checkpoint is round 2, iteration 2
            raise _KilledError
        return real_step(*args, **kwargs)

    monkeypatch.setattr(du, "distil_step", dies_at_the_eighth_step)
    with pytest.raises(_KilledError):
        du.progressive_distill_unclip(teacher, latents, tokens, plan, tmp_path / "killed", checkpoint_every=2,
                                      progress=False)
    state = du.read_checkpoint_state(tmp_path / "killed")
    assert (state["round"], state["iteration"]) == (1, 2) and state["teacher"] == "teacher-r1.safetensors"
    on_disk = sorted(p.name for p in (tmp_path / "killed" / du.CHECKPOINT_DIR).iterdir())
    assert on_disk == [state["optimiser"], du.STATE_NAME, state["student"], state["teacher"]]  # old ones removed

    calls.clear()
    resumed = du.progressive_distill_unclip(teacher, latents, tokens, plan, tmp_path / "killed", checkpoint_every=2,
                                            progress=False)
    assert len(calls) == 3  # iterations 2, 3, 4 of round 2 only
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    other = du.DistillPlan(**{**plan.__dict__, "lr": 1e-4})
    with pytest.raises(ConfigError, match=r"another distillation \(lr: 0.001 -> 0.0001\)"):
        du.progressive_distill_unclip(teacher, latents, tokens, other, tmp_path / "killed", progress=False)


# --- The command, the student folder and the generator that loads it. ---


def _write_images(folder: Path, images: np.ndarray) -> None:
    folder.mkdir()
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{k:02d}.png")


def _config_file(tmp_path: Path, **generator) -> Path:
    values = {"kind": "unclip", "image_size_px": SIDE_PX, "n_steps": 4, "student_steps": 2,
              "unclip_distill_teacher_steps": 4, "unclip_distill_iterations_per_round": 3,
              "unclip_distill_batch_size": 2, "unclip_distill_checkpoint_every": 2, **generator}
    path = tmp_path / "distil.yaml"
    path.write_text("preset: phantom\nembedding:\n  cache_dir: " + str(tmp_path / "emb") + "\ngenerator:\n"
                    + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_distill_unclip_command_writes_a_student_the_generator_loads(tmp_path, capsys) -> None:
    from rtdecoder.cli import main
    from rtdecoder.compose import default_generator_steps, load_generator
    from rtdecoder.config import load_config

    # A teacher as a diffusers folder whose context is the configured embedder's (EfficientNet-Lite0: 49 x 1280).
    images, _ = _toy_world(6)
    save_diffusers_folder(_random_unet(cross_attention_dim=1280), _unit_vae(images), tmp_path / "teacher")
    _write_images(tmp_path / "images", images)
    config = _config_file(tmp_path, unclip_weights_path=str(tmp_path / "teacher"))
    argv = ["engines", "distill-unclip", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "student"),
            "--config", str(config), "--device", "cpu", "--holdout", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| student | 2 |" in out and "generator.unclip_student_path" in out
    student = tmp_path / "student"
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "scheduler_config.json", "distillation.json"):
        assert (student / name).is_file(), name
    assert not (student / du.CHECKPOINT_DIR).exists()
    meta = json.loads((student / "distillation.json").read_text())
    assert meta["steps"] == 2 and meta["n_images"] == 4 and "Salimans" in meta["method"]
    assert main(argv) == 0  # done already: nothing is trained again

    run = load_config(config, overrides={"generator": {"unclip_student_path": str(student)}})
    generator = load_generator(run)
    assert generator.name == "unclip-student" and generator.guidance_scale == 1.0
    assert default_generator_steps(run) == 2 and default_generator_steps(load_config(config)) == 4
    tokens = torch.randn(1, 49, 1280, generator=torch.Generator().manual_seed(0))
    assert generator.generate(tokens, n_steps=2, seed=0).shape == (1, SIDE_PX, SIDE_PX, 3)
    assert isinstance(load_unclip_student(student, SIDE_PX, 2), UnclipGenerator)


def test_missing_weights_name_their_key(tmp_path) -> None:
    from rtdecoder.compose import load_generator
    from rtdecoder.config import load_config

    images, _ = _toy_world(2)
    _write_images(tmp_path / "images", images)
    config = load_config(_config_file(tmp_path))
    with pytest.raises(ConfigError, match="generator.unclip_weights_path"):
        du.run_distillation(config, tmp_path / "images", tmp_path / "out", progress=False)
    with pytest.raises(BundleError, match="generator.unclip_weights_path: no such file"):
        du.run_distillation(config, tmp_path / "images", tmp_path / "out", teacher_path=tmp_path / "absent")
    missing = load_config(_config_file(tmp_path, unclip_student_path=str(tmp_path / "absent")))
    with pytest.raises(BundleError, match="generator.unclip_student_path: no distilled student"):
        load_generator(missing)


# --- torchrun: two processes (gloo on the CPU) average their gradients; only rank 0 writes. ---


def _ddp_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    writes = []
    real_save = du._save_tensors
    du._save_tensors = lambda tensors, path: (writes.append(str(path)), real_save(tensors, path))
    _, tokens = _toy_world(6)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = du.DistillPlan(teacher_steps=4, student_steps=2, iterations_per_round=2, batch_size=2, lr=1e-3,
                          guidance_scale=1.0, image_size_px=SIDE_PX)
    student = du.progressive_distill_unclip(_random_unet(), latents, tokens, plan, folder, checkpoint_every=1,
                                            progress=False)
    torch.save({"state": student.state_dict(), "writes": writes}, Path(folder) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_torchrun_ranks_average_gradients_and_only_rank_0_writes(tmp_path) -> None:
    import torch.multiprocessing as mp

    teacher = _random_unet().state_dict()  # also imports diffusers before the fork
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # spawn, not fork: after earlier tests ran autograd in this process, forked children cannot use it
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["writes"] and not ranks[1]["writes"]
    assert du.read_checkpoint_state(tmp_path)["world_size"] == 2
    changed = False
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(value, ranks[1]["state"][name], rtol=0, atol=0, msg=name)  # the same step on both
        changed |= not torch.equal(value, teacher[name])
    assert changed
