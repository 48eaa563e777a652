"""Few-step students of the phantom generator by progressive distillation (Salimans & Ho 2022).

Each round halves the number of sampling steps: a student, initialised as a copy of its teacher,
learns to reach in one DDIM step the point the teacher reaches in two. Rounds repeat from
``generator.n_steps`` down to ``generator.student_steps`` (16 -> 8 -> 4 -> 2 by default), each
round's student becoming the next round's teacher.

For a clean image ``x``, time ``t`` on the student's grid and ``t' = t - 1/(2N)``,
``t'' = t - 1/N``, the teacher's two steps give ``z''``; the one-step target is the ``x~`` with
``DDIM(z_t, x~; t -> t'') = z''``, i.e.::

    x~ = (z'' - (sigma'' / sigma_t) z_t) / (alpha'' - (sigma'' / sigma_t) alpha_t)

and the student regresses the matching ``v = (alpha_t z_t - x~) / sigma_t``.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch

from rtdecoder.decode.generators.base import from_uint8
from rtdecoder.errors import ConfigError
from rtdecoder.phantom.generator import (
    WEIGHTS_NAME,
    PhantomGenerator,
    PhantomGeneratorNet,
    alpha_sigma,
    load_or_train_phantom_generator,
    load_phantom_net,
    phantom_split,
    phantom_training_data,
    phantom_weights_folder,
    save_phantom_net,
)

logger = logging.getLogger(__name__)


def distill_round(
    teacher: PhantomGeneratorNet,
    targets: torch.Tensor,
    tokens: torch.Tensor,
    student_steps: int,
    n_iterations: int,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> PhantomGeneratorNet:
    """One round of progressive distillation: a ``student_steps`` student of a ``2 * student_steps`` teacher.

    Parameters
    ----------
    teacher : PhantomGeneratorNet
        Unchanged.
    targets : torch.Tensor of shape (N, 3, S, S)
        Clean images in [-1, 1].
    tokens : torch.Tensor of shape (N, T, D)
    student_steps : int
    n_iterations : int
        Optimiser steps.

    Returns
    -------
    PhantomGeneratorNet
        The student, in eval mode.
    """
    from tqdm import tqdm

    teacher = teacher.eval()
    student = copy.deepcopy(teacher).train()
    optimiser = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(n_iterations), desc=f"distil {2 * student_steps}->{student_steps} steps", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(targets), (batch_size,), generator=generator)
        x = targets[rows]
        i = torch.randint(1, student_steps + 1, (batch_size,), generator=generator).float()
        t, t_mid, t_end = i / student_steps, (i - 0.5) / student_steps, (i - 1) / student_steps
        a_t, s_t = (v[:, None, None, None] for v in alpha_sigma(t))
        z = a_t * x + s_t * torch.randn(x.shape, generator=generator)
        v_target = distillation_target(teacher, z, t, t_mid, t_end, tokens[rows])
        loss = torch.nn.functional.mse_loss(student(z, t, student.context(tokens[rows])), v_target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return student.eval()


@torch.no_grad()
def distillation_target(teacher: PhantomGeneratorNet, z: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                        t_end: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The ``v`` whose single DDIM step ``t -> t_end`` lands where the teacher's two steps do.

    Parameters
    ----------
    teacher : PhantomGeneratorNet
    z : torch.Tensor of shape (B, 3, S, S)
        Noisy images at times ``t``.
    t, t_mid, t_end : torch.Tensor of shape (B,)
        Start, middle and end times, ``t > t_mid > t_end >= 0``.
    tokens : torch.Tensor of shape (B, T, D)

    Returns
    -------
    torch.Tensor of shape (B, 3, S, S)
    """
    z_end = _teacher_two_steps(teacher, z, t, t_mid, t_end, teacher.context(tokens))
    a_t, s_t = (v[:, None, None, None] for v in alpha_sigma(t))
    a_e, s_e = (v[:, None, None, None] for v in alpha_sigma(t_end))
    ratio = s_e / s_t
    x_target = (z_end - ratio * z) / (a_e - ratio * a_t)
    return (a_t * z - x_target) / s_t


def _teacher_two_steps(teacher: PhantomGeneratorNet, z: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                       t_end: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    for start, stop in ((t, t_mid), (t_mid, t_end)):
        v = teacher(z, start, context)
        a, s = (w[:, None, None, None] for w in alpha_sigma(start))
        a2, s2 = (w[:, None, None, None] for w in alpha_sigma(stop))
        x0 = (a * z - s * v).clamp(-1, 1)
        z = a2 * x0 + s2 * (s * z + a * v)
    return z


def progressive_distillation(
    teacher: PhantomGeneratorNet,
    images: np.ndarray,
    tokens: torch.Tensor,
    teacher_steps: int,
    student_steps: int,
    iterations_per_round: int,
    seed: int = 0,
    progress: bool = True,
) -> PhantomGeneratorNet:
    """Halve the step count round by round from ``teacher_steps`` to ``student_steps``.

    Parameters
    ----------
    teacher : PhantomGeneratorNet
    images : numpy.ndarray of uint8, shape (N, S, S, 3)
        Training images (at the generator's size).
    tokens : torch.Tensor of shape (N, T, D)
    teacher_steps, student_steps : int
        ``teacher_steps / student_steps`` must be a power of two.
    iterations_per_round : int

    Returns
    -------
    PhantomGeneratorNet
    """
    ratio = teacher_steps / student_steps
    if student_steps < 1 or ratio < 1 or not math.log2(ratio).is_integer():
        raise ConfigError(
            f"distillation: generator.n_steps / generator.student_steps: expected a power of two "
            f"(got {teacher_steps} / {student_steps})"
        )
    targets = from_uint8(images, teacher.sizes["image_size_px"])
    net, steps = teacher, teacher_steps
    while steps > student_steps:
        steps //= 2
        net = distill_round(net, targets, tokens.float(), steps, iterations_per_round, seed=seed + steps,
                            progress=progress)
    return net


def load_or_distill_phantom_student(config: Any, progress: bool = True) -> PhantomGenerator:
    """The distilled phantom student (``generator.student_steps`` steps), made on first use and cached.

    Loads (or trains) the teacher with
    :func:`~rtdecoder.phantom.generator.load_or_train_phantom_generator`, then
    distils on the same training stimuli; weights go to ``.../phantom-<key>/student``.
    """
    gen = config.generator
    folder = phantom_weights_folder(config, "student")
    if not (folder / WEIGHTS_NAME).is_file():
        teacher = load_or_train_phantom_generator(config, progress)
        train_idx, _ = phantom_split(config.phantom.n_stimuli)
        images, tokens = phantom_training_data(config, train_idx, progress)
        student = progressive_distillation(teacher.net, images, tokens, gen.n_steps, gen.student_steps,
                                           gen.distill_steps_per_round, seed=config.phantom.seed, progress=progress)
        save_phantom_net(student, folder, extra={"distilled_from_steps": gen.n_steps, "steps": gen.student_steps})
    # No guidance: the student learnt the unguided teacher.
    return PhantomGenerator(load_phantom_net(folder), "phantom-student", 1.0)
