"""Typed, validated configuration read from YAML.

A configuration is one :class:`RTDecoderConfig`, made of frozen sections (one per stage of the
data's path). Files are YAML; a file may start from a shipped preset with ``preset: phantom`` and
override only the keys it names. Unknown keys, wrong types and values out of range are rejected
with the file, the key path and what was expected::

    my.yaml: glm.method: expected 'lss' or 'lsa' (got 'lsq')

Sizes carry their unit in their name (``tr_s``, ``voxel_size_mm``, ``beta_wait_s``).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rtdecoder.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
#: GLMsingle's default grid of ridge fractions: 0.05 to 1 in steps of 0.05.
DEFAULT_FRACRIDGE_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 21))

# Keys that files written by :func:`save_config` may still hold but that no longer exist, with why
# they went. They are dropped on reading, with a warning naming them, so that subject bundles
# calibrated before a key was retired still load; YAML files get no such leniency (a stale key
# there is an error that gives the reason, so its author removes it).
_RETIRED_SAVED_KEYS: tuple[tuple[str, str, str], ...] = (
    ("generator", "retrieval_top_k", "a never-read duplicate of session.retrieval_top_k"),
    (
        "preprocess", "normalise",
        "never read: voxel time series are always converted to percent signal change of the calibration "
        "mean, and betas z-scored with the bundle's beta_mean/beta_std, as the model was trained",
    ),
)
_RETIRED_REASONS = {(section, key): reason for section, key, reason in _RETIRED_SAVED_KEYS}


class Section(BaseModel):
    """Base of every section: frozen, and unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PhantomConfig(Section):
    """The simulated world: subjects, their anatomy, noise and head motion."""

    seed: int = 0
    n_subjects: int = Field(8, ge=1)
    n_stimuli: int = Field(3000, ge=2)
    image_size_px: int = Field(224, ge=32)
    grid_shape: tuple[int, int, int] = (48, 56, 46)
    voxel_size_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    n_voxels: int = Field(2500, ge=10, description="mean visual-mask size; subjects differ")
    n_voxels_spread: float = Field(0.15, ge=0.0, lt=1.0, description="relative spread between subjects")
    latent_dim: int = Field(64, ge=2, description="shared latent of the image embedding")
    snr: float = Field(
        0.35, gt=0.0,
        description="single-trial response std / std of its least-squares estimation noise",
    )
    noise_ar1: float = Field(0.4, ge=0.0, lt=1.0)
    physio_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="share of noise variance that is cardiac/respiratory"
    )
    drift_fraction: float = Field(0.5, ge=0.0, description="low-frequency drift std / noise std")
    motion_drift_mm: float = Field(0.3, ge=0.0, description="std of slow head drift over a run")
    motion_jump_per_min: float = Field(0.3, ge=0.0, description="rate of sudden head jumps")
    motion_jump_mm: float = Field(0.8, ge=0.0, description="typical size of a jump")


class ScannerConfig(Section):
    """How the (real or simulated) scanner acquires and exports volumes."""

    tr_s: float = Field(1.6, gt=0.0)
    export_format: Literal["mosaic", "enhanced", "nifti"] = "mosaic"
    slice_order: Literal["ascending", "descending", "interleaved"] = "interleaved"
    tile_order: Literal["FH", "HF"] = "FH"


class ExperimentConfig(Section):
    """The shape of a session: NSD-like trials, runs and repeats."""

    image_s: float = Field(3.0, gt=0.0)
    blank_s: float = Field(1.0, ge=0.0)
    trials_per_run: int = Field(62, ge=1)
    runs_per_session: int = Field(12, ge=1)
    lead_in_s: float = Field(4.8, ge=0.0, description="rest before the first trial of a run")
    lead_out_s: float = Field(12.8, ge=0.0, description="rest after the last trial (HRF decay)")
    n_test_images: int = Field(100, ge=0, description="images shown test_repeats times")
    test_repeats: int = Field(3, ge=1)
    sessions_per_subject: int = Field(4, ge=1)


class EmbeddingConfig(Section):
    """The image-embedding space the decoder predicts."""

    model: Literal["efficientnet_lite0", "openclip"] = "efficientnet_lite0"
    n_tokens: int = Field(49, ge=1)
    token_dim: int = Field(1280, ge=1)
    openclip_arch: str = Field(
        "ViT-bigG-14", description="open_clip architecture name, or a local .json model config"
    )
    weights_path: str | None = None
    cache_dir: str = "rtdecoder-cache/embeddings"
    image_range: Literal["zero_one", "minus_one_one"] = Field(
        "zero_one",
        description="range the embedder takes its [0, 1] pixels to be in: zero_one (correct) or "
        "minus_one_one (MindEye2 reference, needed for its released weights); "
        "see rtdecoder/embedding/base.py and docs/mindeye2.md",
    )


class CandidatesConfig(Section):
    """The images the live decoder retrieves among (a lab's own set): a folder or an embeddings file.

    ``calibrate`` also ranks its held-out images among them when set (the live decoder's view).
    Outside the phantom world one of the two is required by ``rtdecoder run``.
    """

    images_dir: str | None = Field(
        None,
        description="folder of candidate images (PNG/JPEG/BMP/TIFF/WebP); ids are the file stems (the stim_id), "
        "embedded once and cached by content (SHA-256 of the files' bytes)",
    )
    embeddings_file: str | None = Field(
        None,
        description="precomputed candidates: a safetensors file with tokens (n, n_tokens, token_dim) and metadata "
        "ids (JSON list) and embedder (the embedder's name); see rtdecoder/embedding/cache.py",
    )
    embed_batch_size: int = Field(32, ge=1, description="images read and embedded at a time (bounds memory)")
    hubness_k: int = Field(
        10, ge=0,
        description="hubness correction of retrieval (CSLS): candidates are ranked by cosine less half their mean "
        "cosine to the k nearest of the bundle's calibration-training predictions, so that no image wins for most "
        "trials; 0 ranks by plain cosine. Also how calibrate and evaluate score retrieval; see "
        "rtdecoder/decode/hubness.py and docs/calibration.md",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CandidatesConfig:
        if self.images_dir and self.embeddings_file:
            raise ValueError("set images_dir or embeddings_file, not both")
        return self


class IngestConfig(Section):
    """Watching the export folder and taking complete volumes in order."""

    watch_mode: Literal["inotify", "polling"] = "inotify"
    poll_interval_s: float = Field(0.02, gt=0.0)
    incomplete_timeout_s: float = Field(10.0, gt=0.0)
    missing_volume_wait_s: float = Field(4.0, gt=0.0, description="wait before a gap is declared missing")


class PreprocessConfig(Section):
    """Motion correction, masking and normalisation."""

    motion_correction: bool = True
    motion_max_iterations: int = Field(10, ge=1)
    motion_tolerance_mm: float = Field(
        0.005, gt=0.0, description="stop when an update moves points by less (FD-style, mm)"
    )
    motion_n_samples: int = Field(
        10000, ge=100, description="reference voxels (strongest gradient) the fit samples"
    )


class GLMConfig(Section):
    """The incremental single-trial GLM."""

    method: Literal["lss", "lsa"] = "lss"
    hrf: Literal["canonical", "library"] = "canonical"
    hrf_selection: Literal["crossval", "onoff", "single_trial"] = Field(
        "crossval",
        description="calibration only, with hrf: library: how each voxel's library HRF is chosen (the bundle keeps "
        "the choice): crossval, an ON-OFF model (all trials one regressor) fitted on the other runs and scored on "
        "each held-out run (onoff for a one-run session); onoff, the ON-OFF model's R^2 per run; single_trial, the "
        "single-trial model's R^2, GLMsingle's rule, which overfits and picks late shapes (rtdecoder/glm/hrf.py)",
    )
    drift_model: Literal["polynomial", "cosine"] = "polynomial"
    drift_order: int = Field(2, ge=0, description="polynomial degree")
    high_pass_hz: float = Field(0.01, gt=0.0, description="cosine drift cut-off")
    motion_confounds: bool = True
    beta_wait_s: float = Field(8.0, ge=0.0, description="seconds after onset before a beta is released")
    min_residual_dof: int = Field(
        20, ge=0,
        description="a trial's first live beta also waits until the run's volumes exceed its model's columns by "
        "this many (the first trials of a run would otherwise be released just estimable, mostly noise); "
        "refinements and final betas are not held back",
    )
    publish_refinements: bool = True
    live_contrast: bool = Field(
        False,
        description="LSS only: first releases and refinements are the trial's contrast against the other trials "
        "(b_j - b_others) plus the bundle's mean beta, instead of b_j, whose level shares one error across the "
        "run's trials until the run's end (rtdecoder/glm/incremental.py); final betas are plain LSS either way",
    )
    fracridge: bool = Field(
        False,
        description="calibration only: GLMsingle-style fractional ridge betas, one fraction per voxel chosen "
        "on repeated training images, rescaled onto the OLS betas (see rtdecoder/calibration/betas.py); the live GLM "
        "stays OLS",
    )
    fracridge_fractions: tuple[float, ...] = Field(
        DEFAULT_FRACRIDGE_FRACTIONS,
        description="candidate fractions of the OLS betas' norm, each in (0, 1]; must hold 1 (OLS)",
    )
    slice_time_ref_s: float | Literal["auto"] = Field(
        "auto",
        description="time within the TR that a volume's sample stands for, s (nilearn's slice_time_ref * t_r): "
        "'auto' takes the median slice acquisition time of the run's first volume (0 when the volumes carry "
        "no slice times), or a number of seconds, 0 to the TR; calibration and the live GLM use the same rule "
        "(rtdecoder.glm.design.slice_time_ref_from)",
    )
    glmdenoise: bool = Field(
        False,
        description="GLMdenoise noise regressors: spatial PCA components of a pool of task-unresponsive brain "
        "voxels outside the mask, their count cross-validated across calibration runs (0 allowed); the bundle "
        "keeps them and the live GLM adds each volume's projection as nuisance columns (rtdecoder/glm/denoise.py)",
    )
    glmdenoise_max_components: int = Field(
        10, ge=1, le=50, description="calibration only: most noise components GLMdenoise tries (numpcstotry)"
    )

    @field_validator("slice_time_ref_s", mode="before")
    @classmethod
    def _auto_or_seconds(cls, value: Any) -> Any:
        # Before pydantic's own union check, so that a wrong value gets one message at the key's path.
        expected = "expected 'auto' or a time within the TR in seconds, >= 0 (the TR is checked against the volumes)"
        if isinstance(value, str):
            if value != "auto":
                raise ValueError(expected)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
            raise ValueError(expected)
        return float(value)

    @field_validator("fracridge_fractions")
    @classmethod
    def _fractions_in_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("expected at least one fraction")
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"expected each fraction in (0, 1]; out of range: {bad}")
        if 1.0 not in value:
            raise ValueError("expected 1.0 among the fractions (no shrinkage, kept by voxels that ridge does not help)")
        return tuple(sorted(set(value)))


class VoxelSelectionConfig(Section):
    """``calibrate --mask auto``: the decoding voxels chosen from the calibration session."""

    n_voxels: int = Field(
        15000, ge=10,
        description="voxels kept: those of highest split-half reliability (repeated images' betas) inside the EPI "
        "brain mask of the motion reference (rtdecoder/calibration/voxel_selection.py); about NSD's nsdgeneral "
        "size at 1.8 mm",
    )


class ModelConfig(Section):
    """MindEye2 sizes: adapter, backbone, heads and diffusion prior."""

    hidden_dim: int = Field(512, ge=8)
    n_blocks: int = Field(2, ge=0)
    dropout: float = Field(0.15, ge=0.0, lt=1.0)
    n_tokens: int = Field(49, ge=1)
    token_dim: int = Field(1280, ge=1)
    clip_head_layers: int = Field(3, ge=0)
    lowlevel: bool = False
    prior_dim: int = Field(256, ge=8)
    prior_depth: int = Field(2, ge=1)
    prior_heads: int = Field(4, ge=1)
    prior_timesteps: int = Field(100, ge=2)
    prior_cond_drop: float = Field(0.2, ge=0.0, lt=1.0)
    prior_sample_steps: int = Field(20, ge=1)
    use_prior: bool = Field(True, description="build the diffusion prior (off: retrieval only)")
    prior_ff_mult: int = Field(4, ge=1, description="prior feed-forward width / prior_dim (SwiGLU)")
    prior_sample_eta: float = Field(1.0, ge=0.0, description="DDIM eta: 0 deterministic, 1 DDPM-like")
    lowlevel_channels: int = Field(4, ge=1, description="channels of the low-level output (4: SD-VAE latent)")
    lowlevel_upsamples: int = Field(2, ge=0, description="x2 upsamplings from 7x7 (2: 28x28 px)")
    lowlevel_decoder: Literal["conv", "vae"] = Field(
        "conv",
        description="conv: our small conv decoder; vae: a diffusers VAE decoder as in the released MindEye2 "
        "(block widths 32, 64, 128 for 2 upsamplings, one resnet layer per block)",
    )
    prior_network: Literal["compact", "dalle2"] = Field(
        "compact",
        description="compact: our pre-norm transformer (rtdecoder/decode/prior.py); dalle2: the released "
        "MindEye2 prior network (rtdecoder/decode/prior_dalle2.py), needs prior_dim == token_dim",
    )
    prior_dim_head: int | None = Field(
        None, ge=1, description="dalle2 only: width of each attention head (paper: 52); default prior_dim / heads"
    )
    prior_ddim_schedule: Literal["uniform", "dalle2"] = Field(
        "uniform",
        description="uniform: prior_sample_steps denoiser calls on evenly spaced timesteps; dalle2: the released "
        "sampler's grid and alpha indexing (prior_sample_steps grid points, one fewer denoiser calls)",
    )

    @model_validator(mode="after")
    def _prior_sizes_fit(self) -> ModelConfig:
        if self.prior_network == "compact" and self.prior_dim % self.prior_heads:
            raise ValueError(
                f"prior_dim ({self.prior_dim}) must be a multiple of prior_heads ({self.prior_heads})"
            )
        if self.prior_network == "dalle2" and self.prior_dim != self.token_dim:
            raise ValueError(
                f"prior_network 'dalle2' works on the tokens themselves: prior_dim ({self.prior_dim}) must equal "
                f"token_dim ({self.token_dim})"
            )
        if self.prior_network == "dalle2" and self.prior_dim_head is None and self.prior_dim % self.prior_heads:
            raise ValueError(
                f"prior_dim ({self.prior_dim}) must be a multiple of prior_heads ({self.prior_heads}) "
                "unless prior_dim_head is given"
            )
        if self.prior_ddim_schedule == "dalle2" and not 2 <= self.prior_sample_steps < self.prior_timesteps:
            raise ValueError(
                f"prior_ddim_schedule 'dalle2': prior_sample_steps ({self.prior_sample_steps}) must be in "
                f"2..{self.prior_timesteps - 1} (the released sampler's DDIM range)"
            )
        return self


class TrainingConfig(Section):
    """The MindEye2 training recipe (paper values unless the preset says otherwise)."""

    epochs: int = Field(150, ge=1)
    batch_size: int = Field(24, ge=2)
    pretrain_epochs: int = Field(150, ge=1, description="epochs of multi-subject pretraining")
    pretrain_batch_size: int = Field(42, ge=2, description="global batch of pretraining (paper: 6 per subject x 7)")
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    mixco_fraction: float = Field(1 / 3, ge=0.0, le=1.0, description="share of epochs with BiMixCo")
    prior_loss_weight: float = Field(30.0, ge=0.0)
    clip_loss_weight: float = Field(1.0, ge=0.0)
    lowlevel_loss_weight: float = Field(0.5, ge=0.0)
    mixed_precision: bool = True
    seed: int = 0
    ensemble_size: int = Field(
        1, ge=1, le=16,
        description="calibration: models trained with seeds seed, seed+1, ...; the live decoder averages their "
        "outputs (rtdecoder.decode.ensemble)",
    )
    cpu_bf16: bool = Field(False, description="bf16 autocast on CPU too (off: often slower there)")
    warmup_epochs: float = Field(2.0, ge=0.0, description="OneCycle warm-up length in epochs")
    final_div_factor: float = Field(1000.0, gt=0.0, description="OneCycle final lr = initial / this")
    mixco_temperature: float = Field(0.006, gt=0.0)
    mixco_beta: float = Field(0.15, gt=0.0, description="mixup coefficient ~ Beta(a, a)")
    mixco_prob: float = Field(0.5, ge=0.0, le=1.0, description="share of samples mixed")
    softclip_temperature_start: float = Field(0.004, gt=0.0)
    softclip_temperature_end: float = Field(0.0075, gt=0.0)
    checkpoint_every_epochs: int = Field(1, ge=1)
    finetune_shared_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0,
        description="fine-tuning: learning rate of the pretrained weights / the new adapter's (paper: 1)",
    )
    live_beta_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="calibration: share of each step's trials given as one of their live betas (the first release "
        "or a refinement, from the calibration session replayed through the live front end) instead of their "
        "final beta, so that the model also learns the earlier, noisier betas it decodes live (0: off)",
    )
    live_beta_max_after_onset_s: float = Field(
        29.5, gt=0.0,
        description="calibration: the latest live beta used for live_beta_fraction, s after the trial's onset "
        "(real-time MindEye's slow stage)",
    )


class PublishConfig(Section):
    """The ZeroMQ result stream and control socket (see docs/protocol.md)."""

    result_address: str = "tcp://127.0.0.1:5555"
    control_address: str = "tcp://127.0.0.1:5556"
    encoding: Literal["msgpack", "json"] = "msgpack"
    send_hwm: int = Field(10000, ge=1, description="messages queued per subscriber before dropping")
    history_size: int = Field(2000, ge=1, description="messages kept in memory for 'last N'")
    curve: bool = False
    server_secret_key_file: str | None = None
    client_public_keys_dir: str | None = None

    @model_validator(mode="after")
    def _curve_needs_keys(self) -> PublishConfig:
        if self.curve and not (self.server_secret_key_file and self.client_public_keys_dir):
            raise ValueError(
                "curve: true needs server_secret_key_file and client_public_keys_dir "
                "(make them with 'rtdecoder keys make')"
            )
        return self


class GeneratorConfig(Section):
    """Reconstruction (tokens -> image) and the inference engines that run the decoder."""

    kind: Literal["phantom", "unclip"] = "phantom"
    image_size_px: int = Field(32, ge=8, description="side of the generated image")
    n_steps: int = Field(16, ge=1, description="sampling steps of the full (teacher) generator")
    student_steps: int = Field(2, ge=1, le=4, description="steps of the distilled student")
    guidance_scale: float = Field(
        1.0, ge=0.0,
        description="classifier-free guidance of the generator (unCLIP and the phantom teacher; MindEye2: 5); 1 = none",
    )
    unclip_weights_path: str | None = Field(None, description="generative-models unCLIP checkpoint")
    unclip_student_path: str | None = Field(
        None,
        description="a distilled unCLIP student folder ('rtdecoder engines distill-unclip --out'); when set, kind "
        "'unclip' renders with it at student_steps steps, unguided (guidance was folded in), instead of the teacher",
    )
    unclip_distill_teacher_steps: int = Field(
        32, ge=2, description="distill-unclip: Euler steps of the first round's teacher; student_steps times a "
        "power of two (rounds halve it: 32 -> 16 -> 8 -> 4)",
    )
    unclip_distill_iterations_per_round: int = Field(
        2000, ge=1, description="distill-unclip: optimiser steps per round"
    )
    unclip_distill_batch_size: int = Field(
        4, ge=1, description="distill-unclip: latents per optimiser step and process (torchrun: times the processes)"
    )
    unclip_distill_lr: float = Field(1e-5, gt=0.0, description="distill-unclip: AdamW learning rate")
    unclip_distill_checkpoint_every: int = Field(
        250, ge=1, description="distill-unclip: iterations between resumable checkpoints in OUT/checkpoints"
    )
    unclip_distill_gradient_checkpointing: bool = Field(
        False, description="distill-unclip: recompute the student's activations (less GPU memory, slower)"
    )
    cache_dir: str = "rtdecoder-cache/generators"
    phantom_train_steps: int = Field(1500, ge=1)
    phantom_batch_size: int = Field(32, ge=2)
    phantom_lr: float = Field(2e-3, gt=0.0)
    phantom_cross_dim: int = Field(64, ge=8, description="tokens are projected to this width")
    distill_steps_per_round: int = Field(150, ge=1)
    lowlevel_weight: float = Field(
        0.25, ge=0.0, le=1.0,
        description="share of the low-level (blurry) image in each reconstruction when the bundle's model has "
        "the low-level head (model.lowlevel; MindEye2: 0.25); 0: the generator's image alone",
    )
    engine_backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    engine_dir: str = "rtdecoder-cache/engines"
    onnx_opset: int = Field(18, ge=13)
    tensorrt_fp16: bool = True
    max_batch: int = Field(8, ge=1, description="largest batch the engines are built for")


class CaptionConfig(Section):
    """Captions of the seen image from the prior's predicted tokens (MindEye2: GIT-large-COCO, 20 tokens).

    A caption stage after the prior (rtdecoder/decode/caption.py, docs/captions.md): a linear map takes
    the predicted tokens to the captioner's image-encoder tokens, and a GIT model decodes them into
    text. Off, with a message naming the key, where the weights are missing; the phantom world
    trains its own small captioner when ``git_weights_dir`` is not set.
    """

    enabled: bool = Field(
        True, description="caption every decode whose prior runs (reconstructed, or reconstruction off; not those "
        "skipped for the backlog), when the captioner's weights are there"
    )
    git_weights_dir: str | None = Field(
        None, description="local folder of a GIT captioner saved by transformers (config.json, weights, tokenizer "
        "files), e.g. GIT-large-COCO; nothing is downloaded. Unset: no captions, except in the phantom world"
    )
    map_path: str | None = Field(
        None, description="safetensors linear map predicted tokens -> the captioner's image-encoder tokens "
        "(python -m rtdecoder.decode.caption fit-map makes one); default caption_map.safetensors in git_weights_dir"
    )
    max_new_tokens: int = Field(
        20, ge=1, le=128, description="token budget of one caption (MindEye2: 20): decoding stops there, so the "
        "stage's time is bounded within the trial window"
    )
    num_beams: int = Field(1, ge=1, le=8, description="1: greedy decoding; more: beam search of this width")
    cache_dir: str = Field(
        "rtdecoder-cache/captioners", description="phantom world: its captioner, trained on first use"
    )
    phantom_train_steps: int = Field(1000, ge=1, description="phantom world: optimiser steps of its captioner")
    phantom_batch_size: int = Field(64, ge=2)
    phantom_lr: float = Field(1e-3, gt=0.0)
    phantom_hidden_dim: int = Field(128, ge=16, description="phantom world: width of its GIT text decoder")


class SessionConfig(Section):
    """The live session: what is published, and what gives way when decoding falls behind."""

    publish_beta_maps: bool = Field(True, description="send each beta map (V float32) in beta messages")
    decode_updates: bool = Field(False, description="decode refined betas too, not only the first release")
    decode_final: bool = Field(False, description="decode each trial's end-of-run beta as well")
    max_decode_backlog: int = Field(
        1, ge=0, description="betas waiting beyond this skip reconstruction (retrieval is never skipped)"
    )
    reconstruct: bool = True
    retrieval_top_k: int = Field(5, ge=1)
    idle_timeout_s: float = Field(
        60.0, gt=0.0, description="end the run when no volume came for this long (counted from its first volume)"
    )
    run_tail_s: float = Field(
        12.0, ge=0.0, description="without n_volumes, a run with events ends this long after its last trial's end"
    )
    reference_index: int = Field(
        3, ge=0, description="without a bundle or --reference: the first run's volume that becomes the "
        "motion reference (the first volumes are not at steady state; those before it wait for it)"
    )
    max_run_volumes: int = Field(
        4000, ge=1, description="without n_volumes or events, the longest run the GLM is planned for"
    )
    heartbeat_s: float = Field(1.0, gt=0.0, description="status message period while nothing else is sent")
    journal_fsync: bool = True


class ViewConfig(Section):
    """The operator's live view: a read-only web page that follows the session's own message stream.

    It binds to loopback unless ``host`` says otherwise; bound beyond loopback, every request must
    carry ``token`` (one is drawn at start when none is set) in its URL.
    """

    enabled: bool = Field(False, description="serve the view with 'rtdecoder run' (also: --view)")
    host: str = Field("127.0.0.1", description="interface to bind; anything but loopback needs the token")
    port: int = Field(8765, ge=0, le=65535, description="TCP port of the page (0: any free port)")
    token: str | None = Field(
        None, min_length=16, description="secret every request must carry as ?token=... (required beyond loopback; "
        "drawn at start when not set)"
    )
    fd_threshold_mm: float = Field(0.9, gt=0.0, description="framewise displacement drawn as the limit, mm")
    history_runs: int = Field(16, ge=1, description="runs kept in the view (a whole session of 12 fits)")
    run_volumes: int = Field(4000, ge=10, description="volumes kept per run (the latest)")
    run_trials: int = Field(200, ge=1, description="decoded trials kept per run (the latest)")
    run_events: int = Field(200, ge=1, description="file problems and state changes kept per run")
    image_memory_mb: float = Field(64.0, gt=0.0, description="reconstructions (PNG) kept in memory, over all runs, MiB")
    thumbnail_px: int = Field(96, ge=16, le=512, description="edge of a candidate thumbnail, pixels")
    thumbnail_cache: int = Field(512, ge=1, description="candidate thumbnails kept encoded")
    max_clients: int = Field(8, ge=1, description="pages following the session at once")
    client_secret_key_file: str | None = Field(
        None, description="with publish.curve: the view's CURVE secret key (an authorised client's .key_secret)"
    )
    server_public_key_file: str | None = Field(None, description="with publish.curve: the session's server.key")

    @field_validator("token")
    @classmethod
    def _token_is_url_safe(cls, value: str | None) -> str | None:
        if value is not None and not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("expected letters, digits, '-' and '_' only (it travels in the URL)")
        return value


class RTDecoderConfig(Section):
    """The whole configuration: one section per stage of the data's path."""

    name: str = "custom"
    phantom: PhantomConfig = PhantomConfig()
    scanner: ScannerConfig = ScannerConfig()
    experiment: ExperimentConfig = ExperimentConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    candidates: CandidatesConfig = CandidatesConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    glm: GLMConfig = GLMConfig()
    voxel_selection: VoxelSelectionConfig = VoxelSelectionConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    generator: GeneratorConfig = GeneratorConfig()
    caption: CaptionConfig = CaptionConfig()
    publish: PublishConfig = PublishConfig()
    session: SessionConfig = SessionConfig()
    view: ViewConfig = ViewConfig()

    @model_validator(mode="after")
    def _model_matches_embedding(self) -> RTDecoderConfig:
        for key in ("n_tokens", "token_dim"):
            if getattr(self.model, key) != getattr(self.embedding, key):
                raise ValueError(
                    f"model.{key} ({getattr(self.model, key)}) must equal embedding.{key} "
                    f"({getattr(self.embedding, key)})"
                )
        return self


PRESETS = ("phantom", "nsd")


def preset_path(name: str) -> Path:
    """Path of a shipped preset YAML file.

    Parameters
    ----------
    name : str
        One of :data:`PRESETS`.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return Path(str(resources.files("rtdecoder.presets") / f"{name}.yaml"))


def load_config(source: str | Path, overrides: dict[str, Any] | None = None) -> RTDecoderConfig:
    """Read and validate a configuration.

    Parameters
    ----------
    source : str or Path
        A preset name (``"phantom"``, ``"nsd"``) or a YAML file. A file may name a preset under
        ``preset:`` and override some of its keys.
    overrides : dict, optional
        Nested values applied last, as if written in the file.

    Returns
    -------
    RTDecoderConfig

    Raises
    ------
    ConfigError
        With the file, the key path and what was expected.
    """
    path = preset_path(str(source)) if str(source) in PRESETS else Path(source)
    raw = _read_yaml(path)
    if "preset" in raw:
        base_name = raw.pop("preset")
        if base_name not in PRESETS:
            raise ConfigError(f"{path}: preset: expected one of {', '.join(PRESETS)} (got {base_name!r})")
        raw = _deep_merge(_read_yaml(preset_path(base_name)), raw)
    if overrides:
        raw = _deep_merge(raw, overrides)
    return config_from_dict(raw, origin=str(path))


def config_from_dict(raw: dict[str, Any], origin: str = "<dict>") -> RTDecoderConfig:
    """Validate a nested dict into a config; ``origin`` names the source in errors."""
    raw = {k: v for k, v in raw.items() if k not in ("_class_name", "_version")}
    try:
        return RTDecoderConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def save_config(config: RTDecoderConfig, path: str | Path) -> None:
    """Write a config as JSON with its class name and schema version."""
    payload = {"_class_name": type(config).__name__, "_version": CONFIG_VERSION}
    payload.update(config.model_dump(mode="json"))
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def read_saved_config(path: str | Path) -> RTDecoderConfig:
    """Read a config written by :func:`save_config`, checking its schema version."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    version = raw.get("_version")
    if version != CONFIG_VERSION:
        raise ConfigError(f"{path}: _version: expected {CONFIG_VERSION} (got {version!r})")
    for section, key, reason in _RETIRED_SAVED_KEYS:
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section].pop(key)
            logger.warning("%s: %s.%s: retired key ignored (%s); saving the config again drops it",
                           path, section, key, reason)
    return config_from_dict(raw, origin=str(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: byte {err.start}: not text; expected a YAML config file in UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level (got {type(raw).__name__})")
    return raw


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            retired = _RETIRED_REASONS.get(tuple(str(part) for part in item["loc"]))
            if retired is not None:
                lines.append(f"{origin}: {loc}: unknown key (retired: {retired}); remove it")
                continue
            allowed = _allowed_keys(item["loc"][:-1])
            lines.append(f"{origin}: {loc}: unknown key; expected one of: {', '.join(allowed)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        message = message.replace("Input should be", "expected")
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{origin}: {loc}: {message}{shown}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = RTDecoderConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)
