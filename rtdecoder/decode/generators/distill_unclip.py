"""Few-step students of the SDXL unCLIP UNet by progressive distillation (Salimans & Ho 2022).

Why this method
---------------
The generator samples with a deterministic ODE solver (Euler on the SDXL noise schedule, see
:mod:`rtdecoder.decode.generators.unclip`), and the live decoder wants each trial's image to be the
one the full sampler would give, only sooner. Progressive distillation trains exactly that: a
student that reaches in one solver step the point the teacher reaches in two, for the same start.
It needs no extra networks (no discriminator, no EMA target, no new embedding layer), keeps the
teacher's architecture and its epsilon output, so the student is a drop-in
``UNet2DConditionModel`` that :class:`~rtdecoder.decode.generators.unclip.UnclipGenerator` runs
unchanged, and it is what the project already uses for the phantom generator
(:mod:`rtdecoder.phantom.distill`). Latent consistency distillation (LCM) was the alternative; its
multistep sampler re-noises at every step, so its 2- and 4-step images are not the teacher's image
of the same noise, which is what the decoder (and the tests) compare with.

Rounds and guidance
-------------------
Rounds halve the step count from ``generator.unclip_distill_teacher_steps`` down to
``generator.student_steps`` (nsd: 32 -> 16 -> 8 -> 4), each round's student becoming the next
round's teacher and starting from its weights. The first round's teacher samples with
classifier-free guidance ``generator.guidance_scale`` (MindEye2: 5, random-noise tokens as the
unconditional context); its student does not, so guidance is folded into the student in that
round (as Meng et al. 2023 distil guided models) and every student step is one UNet pass instead
of two.

The target
----------
In the sigma ("variance exploding") form the Euler sampler works in, ``z = x + sigma * eps`` and
one step from ``sigma_a`` to ``sigma_b`` is ``z_b = z_a + (sigma_b - sigma_a) * eps_hat``. For a
clean latent ``x``, a student step index ``i`` (teacher indices ``j = 2i``, ``2i + 1``,
``2i + 2`` on the teacher's grid, whose even points are the student's grid) and
``z = x + sigma_j * noise``, the teacher's two steps give ``z''``; the student's one step lands
there when its epsilon is::

    eps_target = (z'' - z) / (sigma_{j+2} - sigma_j)

The loss is the mean squared error to it with Salimans & Ho's "truncated SNR" weight: their x-space
weight ``max(SNR, 1)`` (``SNR = 1 / sigma**2`` here), which in epsilon terms is
``max(sigma**2, 1)``, normalised by its batch mean so that the learning rate keeps its meaning.

Checkpoints, progress, several GPUs
-----------------------------------
Every ``generator.unclip_distill_checkpoint_every`` iterations the student and the optimiser go to
``OUT/checkpoints``; at the end of each round but the last, the finished student goes there as
the next round's teacher (weights as safetensors; ``state.json``, which names the files, is
rewritten last and atomically, and older files are removed only after it, so a run killed at any
moment resumes from the last complete checkpoint). Each iteration's batch, times and noise are drawn from a seed made of
(``seed``, round, iteration, rank), so a resumed run repeats exactly the iterations an
uninterrupted one would have done. Under ``torchrun`` (``WORLD_SIZE`` > 1) each process draws its
own batch, :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients, and only rank 0
writes. A finished run leaves a diffusers-style folder (``unet/``, ``vae/``, ``scheduler_config.json``,
``distillation.json``) that ``generator.unclip_student_path`` names.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtdecoder.decode.generators.base import from_uint8
from rtdecoder.decode.generators.unclip import (
    STUDENT_META_NAME,
    UnclipGenerator,
    load_unclip_teacher,
    save_diffusers_folder,
    sdxl_scheduler_config,
)
from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

METHOD = "progressive distillation (Salimans & Ho 2022), guidance folded into round 1 (Meng et al. 2023)"
CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.json"
DATA_NAME = "data.safetensors"
_STATE_VERSION = 1


@dataclass(frozen=True)
class DistillPlan:
    """What one distillation run does; the fields a checkpoint must agree with to be resumed.

    Attributes
    ----------
    teacher_steps : int
        Euler steps of the first round's teacher.
    student_steps : int
        Steps of the final student; ``teacher_steps / student_steps`` is a power of two, at least 2.
    iterations_per_round : int
        Optimiser steps per round.
    batch_size : int
        Latents per optimiser step and process (the global batch is this times the world size).
    lr : float
        AdamW learning rate (no weight decay; gradients clipped to norm 1).
    guidance_scale : float
        Classifier-free guidance of the first round's teacher; 1 = none.
    image_size_px : int
        Side of the images the latents were encoded from (also the SDXL size condition).
    seed : int
        Seeds every draw (batches, times, noise, unconditional tokens).
    """

    teacher_steps: int
    student_steps: int
    iterations_per_round: int
    batch_size: int
    lr: float
    guidance_scale: float
    image_size_px: int
    seed: int = 0

    def __post_init__(self) -> None:
        ratio = self.teacher_steps / self.student_steps if self.student_steps >= 1 else 0.0
        if ratio < 2 or not math.log2(ratio).is_integer():
            raise ConfigError(
                f"distill-unclip: generator.unclip_distill_teacher_steps / generator.student_steps: expected a power "
                f"of two, at least 2 (got {self.teacher_steps} / {self.student_steps})"
            )

    @property
    def rounds(self) -> list[int]:
        """Student steps of each round, e.g. ``[16, 8, 4]`` for 32 -> 4."""
        steps, out = self.teacher_steps, []
        while steps > self.student_steps:
            steps //= 2
            out.append(steps)
        return out

    @classmethod
    def from_config(cls, generator: Any, student_steps: int | None = None, seed: int = 0) -> DistillPlan:
        """The plan of a config's ``generator`` section (``student_steps`` overrides its key)."""
        return cls(
            teacher_steps=generator.unclip_distill_teacher_steps,
            student_steps=student_steps or generator.student_steps,
            iterations_per_round=generator.unclip_distill_iterations_per_round,
            batch_size=generator.unclip_distill_batch_size,
            lr=generator.unclip_distill_lr,
            guidance_scale=generator.guidance_scale,
            image_size_px=generator.image_size_px,
            seed=seed,
        )


# --- The solver grid and the target. ---


@functools.lru_cache(maxsize=16)
def _sdxl_grid(n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return euler_grid(n_steps)


def euler_grid(n_steps: int, scheduler_config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler sampler's grid for ``n_steps`` steps, as :class:`UnclipGenerator` walks it.

    Returns
    -------
    timesteps : torch.Tensor of shape (n_steps,), float32
        Discrete training timesteps (0..999) fed to the UNet, descending.
    sigmas : torch.Tensor of shape (n_steps + 1,), float32
        Noise levels (sigma form, ``z = x + sigma * eps``), descending, the last one 0.
    """
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**(scheduler_config or sdxl_scheduler_config()))
    scheduler.set_timesteps(n_steps)
    return scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu()


def _added_conditions(rows: int, image_size_px: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """SDXL's vector condition: original size (H, W) and crop (0, 0), as UnclipGenerator passes it."""
    time_ids = torch.tensor([[image_size_px, image_size_px, 0, 0]], device=like.device, dtype=like.dtype)
    return {"text_embeds": torch.zeros(rows, 0, device=like.device, dtype=like.dtype),
            "time_ids": time_ids.expand(rows, -1)}


def unet_epsilon(unet: torch.nn.Module, z: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                 context: torch.Tensor, image_size_px: int) -> torch.Tensor:
    """The UNet's noise estimate at per-sample noise levels (the Euler sampler's input scaling).

    Parameters
    ----------
    unet : UNet2DConditionModel (or a DistributedDataParallel wrapping one)
    z : torch.Tensor of shape (B, C, h, w)
        Noisy latents in sigma form.
    sigma, timestep : torch.Tensor of shape (B,)
        Noise level and its discrete timestep, per sample.
    context : torch.Tensor of shape (B, T, D)
        Image tokens (cross-attention context).
    image_size_px : int
        The SDXL size condition.

    Returns
    -------
    torch.Tensor of shape (B, C, h, w), in ``z``'s dtype
    """
    scale = (sigma.to(z.dtype) ** 2 + 1).rsqrt()[:, None, None, None]
    out = unet(z * scale, timestep.to(z.device), encoder_hidden_states=context.to(z.dtype),
               added_cond_kwargs=_added_conditions(z.shape[0], image_size_px, z)).sample
    return out.to(z.dtype)


def guided_epsilon(unet: torch.nn.Module, z: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                   context: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                   image_size_px: int) -> torch.Tensor:
    """:func:`unet_epsilon` with classifier-free guidance against ``uncond`` tokens (both halves in one pass)."""
    if guidance_scale == 1.0 or uncond is None:
        return unet_epsilon(unet, z, sigma, timestep, context, image_size_px)
    both = unet_epsilon(unet, torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([timestep, timestep]),
                        torch.cat([uncond, context]), image_size_px)
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def teacher_two_steps(teacher: torch.nn.Module, z: torch.Tensor, index: torch.Tensor, timesteps: torch.Tensor,
                      sigmas: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None,
                      guidance_scale: float, image_size_px: int) -> torch.Tensor:
    """Two Euler steps of the teacher from grid point ``index`` to ``index + 2``, per sample.

    Parameters
    ----------
    teacher : UNet2DConditionModel
    z : torch.Tensor of shape (B, C, h, w)
        Latents at ``sigmas[index]``.
    index : torch.Tensor of int64, shape (B,)
        Teacher grid index of each sample, ``0 <= index <= len(timesteps) - 2``.
    timesteps : torch.Tensor of shape (n,)
    sigmas : torch.Tensor of shape (n + 1,)
        The teacher's grid (:func:`euler_grid`).
    context, uncond : torch.Tensor of shape (B, T, D)
        Tokens and the unconditional tokens (``None`` without guidance).
    guidance_scale : float
    image_size_px : int

    Returns
    -------
    torch.Tensor of shape (B, C, h, w)
        Latents at ``sigmas[index + 2]``.
    """
    for k in (0, 1):
        sigma, sigma_next = sigmas[index + k].to(z.device), sigmas[index + k + 1].to(z.device)
        eps = guided_epsilon(teacher, z, sigma, timesteps[index + k], context, uncond, guidance_scale,
                             image_size_px)
        z = z + (sigma_next - sigma).to(z.dtype)[:, None, None, None] * eps
    return z


def distillation_target(teacher: torch.nn.Module, z: torch.Tensor, index: torch.Tensor, timesteps: torch.Tensor,
                        sigmas: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None,
                        guidance_scale: float, image_size_px: int) -> torch.Tensor:
    """The epsilon whose one Euler step ``sigmas[index] -> sigmas[index + 2]`` lands where the teacher's two do.

    Arguments as :func:`teacher_two_steps`. Returns a (B, C, h, w) tensor.
    """
    z_end = teacher_two_steps(teacher, z, index, timesteps, sigmas, context, uncond, guidance_scale, image_size_px)
    drop = (sigmas[index + 2] - sigmas[index]).to(z.device, z.dtype)[:, None, None, None]
    return (z_end - z) / drop


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho's ``max(SNR, 1)`` x-space weight as a weight on the epsilon error: ``max(sigma**2, 1)``."""
    return torch.clamp(sigma.float() ** 2, min=1.0)


# --- Several processes (torchrun). ---


@dataclass(frozen=True)
class _World:
    rank: int
    size: int
    device: torch.device

    @property
    def writer(self) -> bool:
        """Only rank 0 writes checkpoints, the student folder and the report."""
        return self.rank == 0


def _world(device: str) -> _World:
    """This process's place: torch.distributed is set up when ``torchrun`` started several processes."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        return _World(0, 1, torch.device(device))
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return _World(rank, dist.get_world_size(), torch.device("cuda", local))
    return _World(rank, dist.get_world_size(), torch.device(device))


def _barrier(world: _World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


# --- Checkpoints. ---


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_checkpoint_state(out: str | Path) -> dict[str, Any] | None:
    """The last complete checkpoint's ``state.json`` under ``OUT/checkpoints``, or ``None``."""
    path = Path(out) / CHECKPOINT_DIR / STATE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _check_resumable(state: dict[str, Any], identity: dict[str, Any], folder: Path) -> None:
    saved = state.get("plan", {})
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if state.get("version") != _STATE_VERSION or differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in differ[:4])
        raise ConfigError(
            f"{folder}: a checkpoint of another distillation ({shown or 'format version'}); resume with the same "
            "settings, or pass another --out (or delete that folder) to start afresh"
        )


class _Checkpointer:
    """Writes and reads ``OUT/checkpoints`` (rank 0 writes; every rank reads)."""

    def __init__(self, out: Path, identity: dict[str, Any], world: _World) -> None:
        self.folder = out / CHECKPOINT_DIR
        self.identity = identity
        self.world = world

    def load(self) -> dict[str, Any] | None:
        state = read_checkpoint_state(self.folder.parent)
        if state is not None:
            _check_resumable(state, self.identity, self.folder)
        return state

    def save(self, round_index: int, iteration: int, student: torch.nn.Module,
             optimiser: torch.optim.Optimizer | None, teacher_file: str | None, loss: float | None) -> None:
        """Write the student and optimiser under fresh names, then point ``state.json`` at them.

        ``optimiser=None`` at a round's start: the next round begins with a fresh optimiser.
        """
        if self.world.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            old = read_checkpoint_state(self.folder.parent)
            tag = f"r{round_index}-i{iteration:07d}"
            student_file = f"student-{tag}.safetensors"
            optimiser_file = None if optimiser is None else f"optimiser-{tag}.pt"
            _save_tensors(student.state_dict(), self.folder / student_file)
            if optimiser is not None:
                tmp = self.folder / (optimiser_file + ".tmp")
                torch.save(optimiser.state_dict(), tmp)
                os.replace(tmp, self.folder / optimiser_file)
            state = {"version": _STATE_VERSION, "plan": self.identity, "round": round_index, "iteration": iteration,
                     "student": student_file, "optimiser": optimiser_file, "teacher": teacher_file,
                     "world_size": self.world.size, "loss": loss}
            _atomic_write_text(self.folder / STATE_NAME, json.dumps(state, indent=2) + "\n")
            keep = {student_file, optimiser_file, teacher_file, DATA_NAME, STATE_NAME}
            if old is not None:  # only after the new state is in place: a kill leaves a complete checkpoint
                for name in (old.get("student"), old.get("optimiser"), old.get("teacher")):
                    if name and name not in keep:
                        (self.folder / name).unlink(missing_ok=True)
        _barrier(self.world)

    def save_teacher(self, round_index: int, teacher: torch.nn.Module) -> str:
        """Keep the next round's teacher (the finished round's student); returns its file name."""
        name = f"teacher-r{round_index}.safetensors"
        if self.world.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            _save_tensors(teacher.state_dict(), self.folder / name)
        _barrier(self.world)
        return name


# --- Training. ---


def _iteration_generator(seed: int, round_index: int, iteration: int, rank: int) -> torch.Generator:
    """The draws of one iteration depend only on these four numbers, so resuming repeats them exactly."""
    state = np.random.SeedSequence([seed, round_index, iteration, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def distil_step(student: torch.nn.Module, teacher: torch.nn.Module, latents: torch.Tensor, tokens: torch.Tensor,
                plan: DistillPlan, n_student_steps: int, guidance_scale: float, generator: torch.Generator,
                device: torch.device, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The loss of one batch (not yet back-propagated).

    Parameters
    ----------
    student : UNet2DConditionModel (or its DistributedDataParallel wrapper), in train mode
    teacher : UNet2DConditionModel
        Frozen; ``2 * n_student_steps`` steps.
    latents : torch.Tensor of shape (N, C, h, w)
        Clean, scaled VAE latents (CPU).
    tokens : torch.Tensor of shape (N, T, D)
        Their image tokens (CPU).
    plan : DistillPlan
    n_student_steps : int
        This round's student steps.
    guidance_scale : float
        The teacher's guidance in this round (the plan's in round 1, then 1).
    generator : torch.Generator
        CPU generator of this iteration's draws.
    device : torch.device
    autocast_dtype : torch.dtype, optional
        Mixed precision of the forward passes (bfloat16 on CUDA); the loss is float32.

    Returns
    -------
    torch.Tensor, scalar
    """
    timesteps, sigmas = _sdxl_grid(2 * n_student_steps)
    rows = torch.randint(0, len(latents), (plan.batch_size,), generator=generator)
    index = 2 * torch.randint(0, n_student_steps, (plan.batch_size,), generator=generator)
    x = latents[rows]
    noise = torch.randn(x.shape, generator=generator)
    context = tokens[rows]
    uncond = torch.randn(context.shape, generator=generator) if guidance_scale != 1.0 else None
    sigma = sigmas[index]
    z = (x + sigma[:, None, None, None] * noise).to(device)
    context = context.to(device)
    uncond = None if uncond is None else uncond.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        target = distillation_target(teacher, z, index, timesteps, sigmas, context, uncond, guidance_scale,
                                     plan.image_size_px)
        pred = unet_epsilon(student, z, sigma.to(device), timesteps[index], context, plan.image_size_px)
    weight = truncated_snr_weight(sigma).to(device)
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    return (weight * per_sample).sum() / weight.sum()


def progressive_distill_unclip(
    teacher: torch.nn.Module,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    plan: DistillPlan,
    out: str | Path,
    device: str = "cpu",
    checkpoint_every: int = 250,
    gradient_checkpointing: bool = False,
    progress: bool = True,
    identity: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Distil ``teacher`` round by round into a ``plan.student_steps`` student, resuming from ``OUT/checkpoints``.

    Parameters
    ----------
    teacher : UNet2DConditionModel
        The unCLIP UNet (image-token cross-attention); not changed.
    latents : torch.Tensor of shape (N, C, h, w)
        Clean VAE latents of the training images, already multiplied by the VAE's scaling factor.
    tokens : torch.Tensor of shape (N, T, D)
        Their image tokens (D = the UNet's ``cross_attention_dim``).
    plan : DistillPlan
    out : str or Path
        Output folder; checkpoints go to ``out/checkpoints``.
    device : str, default="cpu"
        ``"cuda"`` uses bfloat16 autocast for the passes (float32 weights and optimiser).
    checkpoint_every : int, default=250
        Iterations between checkpoints (each round's end is one too).
    gradient_checkpointing : bool, default=False
        Recompute the student's activations in the backward pass (less memory, about 30% slower).
    progress : bool, default=True
        A tqdm bar per round (rank 0).
    identity : dict, optional
        What a checkpoint must match to be resumed (default: the plan's fields).

    Returns
    -------
    UNet2DConditionModel
        The final student, on ``device``, in eval mode.
    """
    from tqdm import tqdm

    world = _world(device)
    checkpoints = _Checkpointer(Path(out), identity or asdict(plan), world)
    state = checkpoints.load()
    autocast_dtype = torch.bfloat16 if world.device.type == "cuda" else None
    latents, tokens = latents.float().cpu(), tokens.float().cpu()

    original = _frozen(teacher)
    student = copy.deepcopy(original).to(world.device, torch.float32)
    first_round, start, teacher_file = 0, 0, None
    if state is not None:
        first_round, start, teacher_file = state["round"], state["iteration"], state["teacher"]
        student.load_state_dict(_load_tensors(checkpoints.folder / state["student"]))
        logger.info("distill-unclip: resuming round %d at iteration %d from %s", first_round + 1, start,
                    checkpoints.folder)
    # The teacher keeps float32 weights: autocast runs its passes in bfloat16 without a second copy.
    round_teacher = original
    if teacher_file is not None:
        round_teacher = copy.deepcopy(original)
        round_teacher.load_state_dict(_load_tensors(checkpoints.folder / teacher_file))
    for round_index in range(first_round, len(plan.rounds)):
        n_steps = plan.rounds[round_index]
        guidance = plan.guidance_scale if round_index == 0 else 1.0
        round_teacher = _frozen(round_teacher.to(world.device))
        student.train().requires_grad_(True)
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        trained = student
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(student, device_ids=[world.device.index] if world.device.type == "cuda"
                                              else None)
        # A fresh optimiser each round, as Salimans & Ho do: the target moves to a new teacher.
        optimiser = torch.optim.AdamW(student.parameters(), lr=plan.lr, weight_decay=0.0)
        if state is not None and round_index == first_round and start > 0:
            optimiser.load_state_dict(torch.load(checkpoints.folder / state["optimiser"], map_location=world.device,
                                                 weights_only=True))
        bar = tqdm(range(start, plan.iterations_per_round), initial=start, total=plan.iterations_per_round,
                   desc=f"distil {2 * n_steps}->{n_steps} steps", disable=not (progress and world.writer))
        loss_value = None
        for iteration in bar:
            generator = _iteration_generator(plan.seed, round_index, iteration, world.rank)
            loss = distil_step(trained, round_teacher, latents, tokens, plan, n_steps, guidance, generator,
                               world.device, autocast_dtype)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # DistributedDataParallel averages the gradients over the processes here
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimiser.step()
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.4g}")
            done = iteration + 1
            if done % checkpoint_every == 0 and done < plan.iterations_per_round:
                checkpoints.save(round_index, done, student, optimiser, teacher_file, loss_value)
        bar.close()
        if gradient_checkpointing:
            student.disable_gradient_checkpointing()
        student.eval()
        if round_index + 1 < len(plan.rounds):
            teacher_file = checkpoints.save_teacher(round_index + 1, student)
            checkpoints.save(round_index + 1, 0, student, None, teacher_file, loss_value)
            if round_teacher is original:  # off the GPU: of the original, only the final comparison needs it
                original.to("cpu")
            round_teacher = copy.deepcopy(student)
        start, state = 0, None
    return student.eval().requires_grad_(False)


# --- Data: image tokens from the configured embedder, latents from the teacher's VAE. ---


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: np.ndarray, image_size_px: int, batch_size: int = 8) -> torch.Tensor:
    """VAE latents of uint8 images, scaled as the UNet sees them.

    Parameters
    ----------
    vae : AutoencoderKL
    images : numpy.ndarray of uint8, shape (N, H, W, 3)
        Resized (area) to ``image_size_px`` when they differ.
    image_size_px : int
    batch_size : int, default=8

    Returns
    -------
    torch.Tensor of shape (N, C, image_size_px / f, image_size_px / f), float32, CPU
        The posterior means times ``vae.config.scaling_factor`` (f: the VAE's downsampling, SDXL 8).
    """
    param = next(vae.parameters())
    out = []
    for first in range(0, len(images), batch_size):
        x = from_uint8(images[first:first + batch_size], image_size_px).to(param.device, param.dtype)
        out.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def prepare_training_data(config: Any, images_dir: str | Path, vae: torch.nn.Module, out: str | Path,
                          world: _World | None = None, progress: bool = True) -> tuple[list[str], torch.Tensor,
                                                                                       torch.Tensor]:
    """Image ids, tokens and latents of a folder, made once (rank 0) and kept in ``OUT/checkpoints``.

    Parameters
    ----------
    config : RTDecoderConfig
        ``embedding`` (the embedder, its cache) and ``generator.image_size_px``.
    images_dir : str or Path
        A folder of image files (:class:`~rtdecoder.embedding.images.ImageFolder`).
    vae : AutoencoderKL
        The teacher's VAE.
    out : str or Path
    world : _World, optional

    Returns
    -------
    ids : list of str
        In file-name order.
    tokens : torch.Tensor of shape (N, T, D), float32
    latents : torch.Tensor of shape (N, C, h, w), float32
    """
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.embedding.cache import load_image_tokens
    from rtdecoder.embedding.images import ImageFolder

    world = world or _World(0, 1, torch.device("cpu"))
    size = config.generator.image_size_px
    folder = ImageFolder(images_dir, size_px=size)
    digest = folder.digest()
    path = Path(out) / CHECKPOINT_DIR / DATA_NAME
    if world.writer and not _data_matches(path, digest, size):
        found = load_image_tokens(images_dir, lambda: make_embedder(config.embedding, device=str(world.device)),
                                  config.embedding.cache_dir, progress=progress)
        images = folder.images(folder.rows(found.ids))
        latents = encode_latents(vae, images, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        tensors = {"tokens": torch.from_numpy(np.ascontiguousarray(found.tokens, np.float32)),
                   "latents": latents.contiguous()}
        meta = {"digest": digest, "image_size_px": str(size), "ids": json.dumps(found.ids),
                "embedder": found.embedding_name}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    _barrier(world)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        ids = json.loads(handle.metadata()["ids"])
        return ids, handle.get_tensor("tokens"), handle.get_tensor("latents")


def _data_matches(path: Path, digest: str, size: int) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    return meta.get("digest") == digest and meta.get("image_size_px") == str(size)


# --- Comparing a student with its teacher. ---


def psnr_db(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio of uint8 images against references, per image, in dB (peak 255)."""
    mse = ((images.astype(np.float64) - reference.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def compare_with_teacher(teacher: UnclipGenerator, student: UnclipGenerator, tokens: torch.Tensor,
                         reference_steps: int, steps: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """How close the student and the few-step teacher come to the teacher's many-step images, same noise.

    Parameters
    ----------
    teacher, student : UnclipGenerator
        The teacher with its guidance; the student without (it learnt the guided teacher).
    tokens : torch.Tensor of shape (N, T, D)
        Held-out image tokens.
    reference_steps : int
        Steps of the reference images (the teacher's ``generator.n_steps``).
    steps : list of int
        Few-step counts to compare at.
    seed : int, default=0
        Image ``k`` starts from the noise of seed ``seed + k`` in every run (one image per call, so
        its noise does not depend on its batch neighbours).

    Returns
    -------
    list of dict
        ``generator`` ("teacher"/"student"), ``steps``, ``psnr_db`` (mean over images, higher is
        closer), ``mse`` (mean squared error of uint8 pixels).
    """
    def render(gen: UnclipGenerator, n_steps: int) -> np.ndarray:
        return np.concatenate([gen.generate(tokens[k:k + 1], n_steps, seed + k) for k in range(len(tokens))])

    reference = render(teacher, reference_steps)
    rows = []
    for n_steps in steps:
        for name, gen in (("teacher", teacher), ("student", student)):
            images = render(gen, n_steps)
            mse = float(((images.astype(np.float64) - reference) ** 2).mean())
            rows.append({"generator": name, "steps": n_steps, "psnr_db": float(psnr_db(images, reference).mean()),
                         "mse": mse, "reference_steps": reference_steps})
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`compare_with_teacher` rows."""
    lines = ["| generator | steps | PSNR vs teacher, dB | pixel MSE vs teacher |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['generator']} | {r['steps']} | {r['psnr_db']:.2f} | {r['mse']:.1f} |")
    return "\n".join(lines)


# --- The whole command. ---


def _teacher_identity(path: Path) -> dict[str, Any]:
    """Cheap identity of the teacher weights (path, size, modification time), not a hash of 18 GB."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"teacher": str(path.resolve()), "teacher_bytes": sum(p.stat().st_size for p in files),
            "teacher_mtime_ns": max(p.stat().st_mtime_ns for p in files)}


def run_distillation(config: Any, images_dir: str | Path, out: str | Path, teacher_path: str | Path | None = None,
                     student_steps: int | None = None, device: str = "cpu", holdout: int = 0,
                     progress: bool = True,
                     on_report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``rtdecoder engines distill-unclip``: teacher + images -> a student folder, resumable.

    Parameters
    ----------
    config : RTDecoderConfig
        ``generator`` (the teacher, the plan, ``n_steps`` for the comparison), ``embedding``.
    images_dir : str or Path
        Training images; the last ``holdout`` (in file-name order) are kept out for the comparison.
    out : str or Path
        The student folder to write (and ``out/checkpoints`` while running).
    teacher_path : str or Path, optional
        A generative-models checkpoint or a diffusers folder (``unet/``, ``vae/``); default
        ``generator.unclip_weights_path``.
    student_steps : int, optional
        Overrides ``generator.student_steps``.
    device : str, default="cpu"
    holdout : int, default=0
        Images held out and compared on at the end (teacher at ``generator.n_steps`` as reference).
    progress : bool, default=True
    on_report : callable, default=print
        Receives the comparison table (rank 0).

    Returns
    -------
    list of dict
        The comparison rows (:func:`compare_with_teacher`); empty without ``holdout``.

    Raises
    ------
    ConfigError
        No teacher named, a step plan that does not halve, too few images, or tokens of another
        width than the UNet's context.
    BundleError
        The teacher's weights are missing.
    """
    gen = config.generator
    source = teacher_path or gen.unclip_weights_path
    if not source:
        raise ConfigError("distill-unclip: generator.unclip_weights_path: the teacher's weights are needed (a "
                          "generative-models checkpoint or a diffusers folder); set it or pass --teacher")
    source = Path(source)
    if not source.exists():
        raise BundleError(f"{source}: generator.unclip_weights_path: no such file or folder (the teacher's weights)")
    plan = DistillPlan.from_config(gen, student_steps)
    out = Path(out)
    world = _world(device)
    from rtdecoder.embedding.images import ImageFolder

    # The images' content (not their names) is part of what a checkpoint must match.
    identity = {**asdict(plan), **_teacher_identity(source), "images": ImageFolder(images_dir).digest(),
                "holdout": holdout, "embedder": config.embedding.model_dump(mode="json", exclude={"cache_dir"})}
    meta_path = out / STUDENT_META_NAME
    if meta_path.is_file():
        finished = json.loads(meta_path.read_text())
        if finished.get("identity") == identity:
            logger.info("distill-unclip: %s already holds this student; nothing to do", out)
            return finished.get("comparison", [])
        raise ConfigError(f"{out}: holds a student distilled with other settings, teacher or images; pass another "
                          "--out (or delete that folder)")
    state = read_checkpoint_state(out)
    if state is not None:  # before any work: a checkpoint of another run is not silently mixed in
        _check_resumable(state, identity, out / CHECKPOINT_DIR)

    unet, vae = load_unclip_teacher(source, gen.image_size_px)
    unet = unet.float()  # float32 master weights for the student copy; a float16 checkpoint is upcast once
    if unet.config.cross_attention_dim != config.embedding.token_dim:
        raise ConfigError(
            f"distill-unclip: embedding.token_dim is {config.embedding.token_dim} but the teacher's UNet takes "
            f"{unet.config.cross_attention_dim}-d tokens; embed with the embedder the teacher was trained on"
        )
    vae = vae.to(world.device)
    ids, tokens, latents = prepare_training_data(config, images_dir, vae, out, world, progress)
    if len(ids) - holdout < 1:
        raise ConfigError(f"distill-unclip: {images_dir}: {len(ids)} images, {holdout} held out: none left to train on")
    train = slice(0, len(ids) - holdout)
    student = progressive_distill_unclip(
        unet, latents[train], tokens[train], plan, out, device=str(world.device),
        checkpoint_every=gen.unclip_distill_checkpoint_every,
        gradient_checkpointing=gen.unclip_distill_gradient_checkpointing, progress=progress, identity=identity,
    )
    rows: list[dict[str, Any]] = []
    if world.writer:
        if holdout:
            teacher_gen = UnclipGenerator(_frozen(unet).to(world.device), vae, gen.image_size_px, gen.guidance_scale,
                                          name="unclip-teacher")
            student_gen = UnclipGenerator(student, vae, gen.image_size_px, 1.0, name="unclip-student")
            steps = sorted({1, plan.student_steps} | ({2} if plan.student_steps >= 2 else set()))
            rows = compare_with_teacher(teacher_gen, student_gen, tokens[len(ids) - holdout:], gen.n_steps, steps)
            on_report(f"held-out images: {holdout}; reference: the teacher at {gen.n_steps} steps, guidance "
                      f"{gen.guidance_scale}\n" + format_comparison(rows))
        save_student_folder(student, vae, out, {
            "method": METHOD, "identity": identity, "steps": plan.student_steps, "teacher_steps": plan.teacher_steps,
            "guidance_scale_folded_in": plan.guidance_scale, "image_size_px": plan.image_size_px,
            "cross_attention_dim": unet.config.cross_attention_dim, "n_images": len(ids) - holdout,
            "world_size": world.size, "comparison": rows,
        })
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    _barrier(world)
    return rows


def save_student_folder(student: torch.nn.Module, vae: torch.nn.Module, out: str | Path, meta: dict[str, Any]) -> None:
    """Write the student as a diffusers folder the generator loads (``generator.unclip_student_path``).

    ``unet/`` (config.json + diffusion_pytorch_model.safetensors), ``vae/`` (the teacher's, so the
    folder decodes on its own), ``scheduler_config.json`` and ``distillation.json`` (``meta``,
    written last: its presence marks a complete folder).
    """
    out = Path(out)
    (out / STUDENT_META_NAME).unlink(missing_ok=True)
    save_diffusers_folder(student.cpu(), vae.cpu(), out)
    _atomic_write_text(out / STUDENT_META_NAME, json.dumps(meta, indent=2) + "\n")
