"""Train MindEye2: multi-subject pretraining and fine-tuning a new subject, one process or DDP.

Recipe (docs/mindeye2.md): every step holds ``batch_size // n_subjects`` trials of each subject,
each through its own adapter, then the shared backbone. Loss = ``prior_loss_weight`` x prior MSE
+ ``clip_loss_weight`` x (BiMixCo for the first ``mixco_fraction`` of epochs, SoftCLIP after)
+ ``lowlevel_loss_weight`` x L1 of the low-level head. AdamW (no decay on biases and norm
gains: every parameter with fewer than 2 dimensions), OneCycle stepped per iteration.

Epochs and randomness. An epoch is ``min over subjects of len(dataset) // per-subject batch``
steps; each subject's trials are shuffled by a generator seeded from ``(seed, epoch)``, and the
mixup plans, prior noise, timesteps and condition-drop masks of a step come from a generator
seeded from ``(seed, global step)``. Every process draws the same values, so one process and N
DDP processes with the same global batch compute the same step, and a resumed run repeats the
draws of an uninterrupted one. Dropout uses torch's global generator, saved in checkpoints.

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) the process group starts from environment
variables (gloo on CPU, nccl on CUDA). Each process takes an equal contiguous share of every
subject's rows of the global batch; contrastive losses see the whole global batch through a
differentiable all-gather, the mean losses are averaged by DDP's gradient all-reduce.

Checkpoints (``out_dir/checkpoint``): the model folder (:meth:`MindEye2.save_pretrained`),
``training_state.safetensors`` (optimizer tensors, RNG state) and ``training_state.json``
(optimizer hyper-parameters, scheduler state, epoch, step, loss history). Written to a
temporary folder and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from rtdecoder.config import TrainingConfig
from rtdecoder.decode import losses as L
from rtdecoder.decode.model import MindEye2
from rtdecoder.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STATE_VERSION = 1


@dataclass
class SubjectDataset:
    """One subject's training trials.

    Attributes
    ----------
    subject_id : str
        Must name an adapter of the model.
    betas : Tensor of shape (N, V), float32
        z-scored single-trial betas.
    targets : Tensor of shape (N, T, D), float32
        Image tokens of each trial's image.
    image_index : Tensor of shape (N,), int64
        Stimulus index of each trial (for bookkeeping and evaluation).
    lowlevel_targets : Tensor of shape (N, C, S, S), optional
        Low-level targets (image or latent); needed when the model has a low-level head.
    live_betas : Tensor of shape (M, V), float32, optional
        Other betas of the same trials, z-scored as ``betas``: the live front end's first releases
        and refinements (``training.live_beta_fraction`` of each step's trials are drawn from them).
    live_rows : Tensor of shape (M,), int64, optional
        The trial (row of ``betas``) of each live beta; required with ``live_betas``.
    """

    subject_id: str
    betas: torch.Tensor
    targets: torch.Tensor
    image_index: torch.Tensor
    lowlevel_targets: torch.Tensor | None = None
    live_betas: torch.Tensor | None = None
    live_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.betas = torch.as_tensor(self.betas, dtype=torch.float32)
        self.targets = torch.as_tensor(self.targets, dtype=torch.float32)
        self.image_index = torch.as_tensor(self.image_index, dtype=torch.int64)
        if self.lowlevel_targets is not None:
            self.lowlevel_targets = torch.as_tensor(self.lowlevel_targets, dtype=torch.float32)
        if (self.live_betas is None) != (self.live_rows is None):
            raise BundleError(f"dataset {self.subject_id}: live_betas and live_rows: expected both or neither")
        n = self.betas.shape[0]
        checks = [
            ("betas", self.betas.ndim == 2, "(N, V)"),
            ("targets", self.targets.ndim == 3 and self.targets.shape[0] == n, f"({n}, T, D)"),
            ("image_index", self.image_index.shape == (n,), f"({n},)"),
        ]
        if self.lowlevel_targets is not None:
            ok = self.lowlevel_targets.ndim == 4 and self.lowlevel_targets.shape[0] == n
            checks.append(("lowlevel_targets", ok, f"({n}, C, S, S)"))
        if self.live_betas is not None:
            self.live_betas = torch.as_tensor(self.live_betas, dtype=torch.float32)
            self.live_rows = torch.as_tensor(self.live_rows, dtype=torch.int64)
            m = self.live_betas.shape[0]
            checks += [("live_betas", self.live_betas.shape == (m, self.betas.shape[1]), f"(M, {self.betas.shape[1]})"),
                       ("live_rows", self.live_rows.shape == (m,), f"({m},)")]
        for name, ok, expected in checks:
            if not ok:
                got = tuple(getattr(self, name).shape)
                raise BundleError(f"dataset {self.subject_id}: {name}: expected shape {expected} (got {got})")
        if self.live_rows is not None:
            if self.live_rows.numel() and not (0 <= int(self.live_rows.min()) and int(self.live_rows.max()) < n):
                raise BundleError(f"dataset {self.subject_id}: live_rows: expected trial rows in [0, {n})")
            # each trial's live betas as one contiguous range, for drawing one of them per step
            order = torch.argsort(self.live_rows, stable=True)
            self.live_betas, self.live_rows = self.live_betas[order], self.live_rows[order]
            self._live_count = torch.bincount(self.live_rows, minlength=n)
            self._live_start = torch.cumsum(self._live_count, 0) - self._live_count

    def batch_betas(self, rows: torch.Tensor, live_fraction: float, gen: torch.Generator) -> torch.Tensor:
        """The betas of ``rows`` for one step: each row with live betas is, with probability
        ``live_fraction``, one of them drawn uniformly (from ``gen``), otherwise its final beta."""
        x = self.betas[rows]
        if self.live_betas is None or live_fraction <= 0:
            return x  # no draws: a dataset without live betas trains exactly as before they existed
        count = self._live_count[rows]
        swap = (torch.rand(len(rows), generator=gen) < live_fraction) & (count > 0)
        pick = self._live_start[rows] + (torch.rand(len(rows), generator=gen) * count).long().clamp(max=count - 1)
        x = x.clone()
        x[swap] = self.live_betas[pick[swap]]
        return x

    def __len__(self) -> int:
        return self.betas.shape[0]


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes
    ----------
    model_dir : Path
        Folder of the trained model (``out_dir/model``).
    global_step : int
        Optimizer steps taken in total (including steps before a resume).
    epoch : int
        Epochs completed.
    losses : list of dict
        Per step: ``total``, ``prior``, ``clip``, ``lowlevel`` (unweighted), ``lr``.
    """

    model_dir: Path
    global_step: int
    epoch: int
    losses: list[dict[str, float]] = field(default_factory=list)


class _StepModule(nn.Module):
    """One forward pass of everything that has weights, so DDP sees a single forward."""

    def __init__(self, model: MindEye2) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        betas: dict[str, torch.Tensor],
        targets: torch.Tensor,
        prior_draws: tuple[torch.Tensor, ...] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        out = self.model(betas)
        prior_pred = None
        if self.model.prior is not None and prior_draws is not None:
            t, noise, *keep_masks = prior_draws  # the dalle2 prior also drops image tokens
            noisy = self.model.prior.add_noise(targets, t, noise)
            prior_pred = self.model.prior.denoise(noisy, t, out.backbone_tokens, *keep_masks)
        return out.clip_tokens, prior_pred, out.lowlevel


def train(
    model: MindEye2,
    datasets: Mapping[str, SubjectDataset],
    config: TrainingConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    stop_after_steps: int | None = None,
    shared_lr_scale: float = 1.0,
) -> TrainResult:
    """Train ``model`` on the subjects in ``datasets`` with the MindEye2 recipe.

    Parameters
    ----------
    model : MindEye2
        Has an adapter for every subject in ``datasets``; trained in place.
    datasets : mapping of subject id to SubjectDataset
        Batches hold an equal share of each, in this mapping's order.
    config : TrainingConfig
    out_dir : str or Path
        Receives ``checkpoint/`` and, at the end, ``model/``.
    resume : bool, default=False
        Continue from ``out_dir/checkpoint`` (which must exist).
    progress : bool, default=True
        Show a tqdm bar (loss, samples/s) on the first process.
    device : str or torch.device, default="cpu"
    stop_after_steps : int, optional
        Stop (and checkpoint) once this many steps are done in total, as if interrupted; the
        schedule still spans all epochs.
    shared_lr_scale : float, default=1.0
        Learning rate of every parameter outside the trained subjects' adapters, as a fraction
        of ``config.lr`` (the adapters get ``config.lr``). :func:`finetune` passes
        ``config.finetune_shared_lr_scale``.

    Returns
    -------
    TrainResult
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    rank, world = _init_distributed(device)
    per_subject = _check_inputs(model, datasets, config, world)
    steps_per_epoch = min(len(ds) // per_subject for ds in datasets.values())
    total_steps = steps_per_epoch * config.epochs
    if total_steps < 4:
        raise ConfigError(
            f"train: epochs x steps per epoch: expected at least 4 optimizer steps (got "
            f"{config.epochs} x {steps_per_epoch}); use more trials or epochs"
        )
    log.info(
        "training %d subjects, %d trials each per step, %d steps/epoch, %d epochs, %d processes",
        len(datasets), per_subject, steps_per_epoch, config.epochs, world,
    )

    torch.manual_seed(config.seed + rank)
    model.to(device).train()
    optimizer = _make_optimizer(model, config, set(datasets), shared_lr_scale)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=total_steps,
        # OneCycle needs a warm-up of at least 2 steps and a decay phase; tiny runs get that
        pct_start=min(max(config.warmup_epochs / config.epochs, 2 / total_steps), 0.5),
        final_div_factor=config.final_div_factor,
    )
    epoch, step_in_epoch, global_step, history = 0, 0, 0, []
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    if resume:
        epoch, step_in_epoch, global_step, history = _load_checkpoint(
            checkpoint_dir, model, optimizer, scheduler, rank
        )
        model.to(device)
        log.info("resumed at epoch %d, step %d", epoch, global_step)

    step_module: nn.Module = _StepModule(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            # adapters of subjects not trained here get no gradient
            find_unused_parameters=bool(set(model.adapters) - set(datasets)),
        )
    autocast = _autocast(config, device)
    bar = tqdm(
        total=total_steps, initial=global_step, disable=not progress or rank != 0,
        desc="train", unit="step", dynamic_ncols=True,
    )
    stopped = False
    samples_per_step = per_subject * len(datasets)
    while epoch < config.epochs and not stopped:
        order = _epoch_order(datasets, config.seed, epoch)
        while step_in_epoch < steps_per_epoch:
            started = time.perf_counter()
            metrics = _train_step(
                step_module, model, datasets, order, step_in_epoch, per_subject, epoch,
                global_step, config, device, rank, world, autocast,
            )
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(metrics)
            global_step += 1
            step_in_epoch += 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['total']:.4f}",
                samples_s=f"{samples_per_step / (time.perf_counter() - started):.0f}",
            )
            if stop_after_steps is not None and global_step >= stop_after_steps:
                stopped = True
                break
        if not stopped:
            epoch, step_in_epoch = epoch + 1, 0
        if stopped or epoch % config.checkpoint_every_epochs == 0 or epoch == config.epochs:
            _save_checkpoint(
                checkpoint_dir, model, optimizer, scheduler, epoch, step_in_epoch, global_step,
                history, rank, world,
            )
    bar.close()
    model_dir = out_dir / MODEL_DIR
    if rank == 0 and not stopped:
        model.save_pretrained(model_dir)
    if world > 1:
        dist.barrier()
    return TrainResult(model_dir, global_step, epoch, history)


def finetune(
    pretrained_dir: str | Path,
    dataset: SubjectDataset,
    config: TrainingConfig,
    out_dir: str | Path,
    keep_other_subjects: bool = False,
    **train_kwargs,
) -> tuple[MindEye2, TrainResult]:
    """Fine-tune a pretrained model for a new subject with the same recipe.

    Loads the shared model, adds a fresh adapter for ``dataset``'s voxel count (replacing one of
    the same id), and trains everything on that subject's trials, the pretrained weights at
    ``config.finetune_shared_lr_scale`` times the adapter's learning rate.

    Parameters
    ----------
    pretrained_dir : str or Path
        A folder written by :meth:`MindEye2.save_pretrained` (for example ``out_dir/model``).
    dataset : SubjectDataset
        The new subject's trials (typically one session).
    config : TrainingConfig
    out_dir : str or Path
    keep_other_subjects : bool, default=False
        Keep the pretraining subjects' adapters in the saved model.
    **train_kwargs
        Passed on to :func:`train` (``device``, ``progress``, ``resume``...).

    Returns
    -------
    model : MindEye2
    result : TrainResult
    """
    model = MindEye2.from_pretrained(pretrained_dir)
    if not keep_other_subjects:
        for subject_id in list(model.adapters):
            model.remove_subject(subject_id)
    # The fresh adapter's initial weights come from the recipe's seed, not from whatever the
    # process drew before: the same session and recipe give the same calibration.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.add_subject(dataset.subject_id, dataset.betas.shape[1])
    train_kwargs.setdefault("shared_lr_scale", config.finetune_shared_lr_scale)
    result = train(model, {dataset.subject_id: dataset}, config, out_dir, **train_kwargs)
    return model, result


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _check_inputs(
    model: MindEye2, datasets: Mapping[str, SubjectDataset], config: TrainingConfig, world: int
) -> int:
    if not datasets:
        raise ConfigError("train: datasets: expected at least one subject (got none)")
    for subject_id, ds in datasets.items():
        if subject_id != ds.subject_id:
            raise ConfigError(f"train: datasets[{subject_id!r}]: holds subject {ds.subject_id!r}")
        if subject_id not in model.adapters:
            raise ConfigError(
                f"train: datasets: no adapter for {subject_id!r}; call model.add_subject first"
            )
        expected_tokens = (model.config.n_tokens, model.config.token_dim)
        if tuple(ds.targets.shape[1:]) != expected_tokens:
            raise ConfigError(
                f"train: {subject_id}: targets: expected tokens {expected_tokens} "
                f"(got {tuple(ds.targets.shape[1:])})"
            )
    without_targets = [s for s, ds in datasets.items() if ds.lowlevel_targets is None]
    if model.lowlevel_head is not None and without_targets:
        # Nothing here makes low-level targets (SD-VAE latents of the images): a released checkpoint's
        # head is kept as it was trained and left out of the loss, rather than refusing to train.
        log.warning(
            "model.lowlevel: no low-level targets for %s; the low-level head is frozen and left out of the loss",
            ", ".join(without_targets),
        )
        model.lowlevel_head.requires_grad_(False)
    per_subject = config.batch_size // len(datasets)
    if per_subject < 2 or per_subject % world:
        raise ConfigError(
            f"train: batch_size: expected at least 2 trials per subject, divisible by the "
            f"{world} processes (got {config.batch_size} for {len(datasets)} subjects)"
        )
    if per_subject * len(datasets) != config.batch_size:
        log.warning("batch_size %d is not a multiple of %d subjects; using %d",
                    config.batch_size, len(datasets), per_subject * len(datasets))
    short = [s for s, ds in datasets.items() if len(ds) < per_subject]
    if short:
        raise ConfigError(f"train: datasets {short}: fewer trials than one batch ({per_subject})")
    return per_subject


def _make_optimizer(
    model: MindEye2, config: TrainingConfig, trained_subjects: set[str], shared_lr_scale: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the trained subjects' adapters at ``config.lr``
    and everything else at ``config.lr * shared_lr_scale``."""
    adapter_ids = {id(p) for s in trained_subjects for p in model.adapters[s].parameters()}
    groups = []
    for is_adapter in (True, False):
        lr = config.lr if is_adapter else config.lr * shared_lr_scale
        params = [p for p in model.parameters() if (id(p) in adapter_ids) == is_adapter]
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _autocast(config: TrainingConfig, device: torch.device):
    if device.type == "cuda" and config.mixed_precision and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and config.mixed_precision and config.cpu_bf16:
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _mixed_seed(seed: int, counter: int, salt: int) -> int:
    return int(np.random.SeedSequence([seed, counter, salt]).generate_state(1)[0])


def _epoch_order(
    datasets: Mapping[str, SubjectDataset], seed: int, epoch: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(_mixed_seed(seed, epoch, 1))
    return {s: torch.randperm(len(ds), generator=gen) for s, ds in datasets.items()}


def _train_step(
    step_module: nn.Module,
    model: MindEye2,
    datasets: Mapping[str, SubjectDataset],
    order: Mapping[str, torch.Tensor],
    step_in_epoch: int,
    per_subject: int,
    epoch: int,
    global_step: int,
    config: TrainingConfig,
    device: torch.device,
    rank: int,
    world: int,
    autocast,
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(_mixed_seed(config.seed, global_step, 2))
    use_mixco = epoch < L.n_mixco_epochs(config)
    local = per_subject // world
    mine = slice(rank * local, (rank + 1) * local)
    betas, plans, targets, lowlevel_targets, local_rows = {}, [], [], [], []
    offset = 0
    for subject_id, ds in datasets.items():
        rows = order[subject_id][step_in_epoch * per_subject : (step_in_epoch + 1) * per_subject]
        x = ds.batch_betas(rows, config.live_beta_fraction, gen)
        if use_mixco:
            plan = L.draw_mixup_plan(per_subject, config.mixco_beta, config.mixco_prob, gen)
            x = L.apply_mixup(x, plan)
            plans.append(plan)
        betas[subject_id] = x[mine].to(device)
        targets.append(ds.targets[rows])
        if ds.lowlevel_targets is not None:
            # the target follows the same mix as the betas that produced the prediction
            low = ds.lowlevel_targets[rows]
            lowlevel_targets.append((L.apply_mixup(low, plans[-1]) if use_mixco else low)[mine])
        local_rows.append(torch.arange(offset, offset + per_subject)[mine])
        offset += per_subject
    global_targets = torch.cat(targets).to(device)  # (B, T, D), all processes
    local_index = torch.cat(local_rows).to(device)
    local_targets = global_targets[local_index]
    prior_draws = None
    if model.prior is not None:
        # drawn for the global batch so that every process sees the same values
        draws = model.prior.draw_training_noise(offset, gen)
        prior_draws = tuple(d[local_index.cpu()].to(device) for d in draws)
    with autocast():
        clip_tokens, prior_pred, lowlevel = step_module(betas, local_targets, prior_draws)
    clip_all = _gather_rows(clip_tokens, per_subject, len(datasets), world)  # (B, T, D)
    brain = L.flatten_normalise(clip_all)
    image = L.flatten_normalise(global_targets)
    if use_mixco:
        clip_loss = L.bimixco_loss(brain, image, L.concat_plans(plans), config.mixco_temperature)
    else:
        clip_loss = L.soft_clip_loss(brain, image, L.softclip_temperature(epoch, config))
    total = config.clip_loss_weight * clip_loss
    metrics = {"clip": clip_loss.item(), "prior": 0.0, "lowlevel": 0.0}
    if prior_pred is not None:
        prior_loss = L.prior_mse(prior_pred, local_targets)
        total = total + config.prior_loss_weight * prior_loss
        metrics["prior"] = prior_loss.item()
    if lowlevel is not None and model.lowlevel_head is not None and any(
        p.requires_grad for p in model.lowlevel_head.parameters()
    ):
        low_target = torch.cat(lowlevel_targets).to(device)
        low_loss = L.lowlevel_l1(lowlevel, low_target)
        total = total + config.lowlevel_loss_weight * low_loss
        metrics["lowlevel"] = low_loss.item()
    total.backward()
    metrics["total"] = total.item()
    return metrics


def _gather_rows(local: torch.Tensor, per_subject: int, n_subjects: int, world: int) -> torch.Tensor:
    """All processes' rows in global order (subject by subject), keeping gradients."""
    if world == 1:
        return local
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # its suggested replacement is private API; this one is public and differentiable
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(local.contiguous())  # world x (n_subjects * local, T, D)
    chunk = per_subject // world
    ordered = [
        parts[r][s * chunk : (s + 1) * chunk] for s in range(n_subjects) for r in range(world)
    ]
    return torch.cat(ordered)


def _save_checkpoint(
    directory: Path,
    model: MindEye2,
    optimizer: torch.optim.Optimizer,
    scheduler,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    history: list[dict[str, float]],
    rank: int,
    world: int,
) -> None:
    if rank == 0:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / MODEL_DIR)
        opt_state = optimizer.state_dict()
        tensors = {"rng.torch": torch.get_rng_state()}
        for index, param_state in opt_state["state"].items():
            for key, value in param_state.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {
            "_version": STATE_VERSION,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "optimizer_param_groups": opt_state["param_groups"],
            "scheduler": scheduler.state_dict(),
            "history": history,
        }
        (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        log.debug("checkpoint at step %d written to %s", global_step, directory)
    if world > 1:
        dist.barrier()


def _load_checkpoint(
    directory: Path, model: MindEye2, optimizer: torch.optim.Optimizer, scheduler, rank: int
) -> tuple[int, int, int, list[dict[str, float]]]:
    state_json = directory / STATE_JSON
    if not state_json.is_file():
        raise BundleError(f"{state_json}: no checkpoint to resume from (train once without resume)")
    meta = json.loads(state_json.read_text())
    if meta.get("_version") != STATE_VERSION:
        raise BundleError(f"{state_json}: _version: expected {STATE_VERSION} (got {meta.get('_version')!r})")
    saved = MindEye2.from_pretrained(directory / MODEL_DIR)
    if saved.subjects != model.subjects or saved.config != model.config:
        raise BundleError(
            f"{directory / MODEL_DIR}: model does not match the one being trained "
            f"(subjects {saved.subjects} vs {model.subjects})"
        )
    model.load_state_dict(saved.state_dict())
    tensors = load_file(str(directory / STATE_TENSORS))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    # dropout draws differ per process, as in a fresh run (seed + rank)
    rng = tensors["rng.torch"] if rank == 0 else torch.manual_seed(int(meta["global_step"]) + rank).get_state()
    torch.set_rng_state(rng)
    return meta["epoch"], meta["step_in_epoch"], meta["global_step"], meta["history"]
