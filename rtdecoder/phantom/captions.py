"""The phantom world's captions: what it knows of each crop, as text, and a small GIT trained on them.

The phantom world has no COCO captions, but it knows exactly what each stimulus is
(:class:`~rtdecoder.phantom.stimuli.StimulusRecord`): the source photo (its subject), where the
crop sits in the photo and how much of it the crop covers. :func:`crop_caption` turns that into a
caption such as ``"a close view of the cat's upper left"``:

* scale, from the crop's side over the photo's short side (0.35 to 1, drawn log-uniformly): below
  0.5 ``close``, below 0.7 ``medium``, else ``wide`` (about a third each);
* position, from the crop's centre in thirds of the photo's width and height: ``upper left``,
  ``top``, ``upper right``, ``left side``, ``center``, ``right side``, ``lower left``, ``bottom``,
  ``lower right`` (in the photo's frame, mirrored crops included);
* subject, one phrase per photo (:data:`SUBJECTS`; the stereo pair ``motorcycle_left`` /
  ``motorcycle_right`` is one subject, ``the motorcycle``).

:func:`load_or_train_phantom_captioner` trains a small ``transformers`` GIT (2 layers, width
``caption.phantom_hidden_dim``) with its caption map, from the embedder's tokens of the bank's
training crops to their captions, and saves it as a lab's captioner folder (GIT weights, tokenizer,
``caption_map.safetensors``), loaded back through :func:`rtdecoder.decode.caption.load_git_captioner`:
the demo's captions come from the production path. Held out are the experiment's test images (the
first ``experiment.n_test_images`` stimuli, never trained on by the decoder either).

Its metric (docs/captions.md)::

    python -m rtdecoder.phantom.captions evaluate            # captions of the held-out images' true tokens
    python -m rtdecoder.phantom.captions evaluate --betas    # and of their tokens decoded from betas

prints exact-subject, scale and position accuracy, exact-caption rate and corpus BLEU-4 against the
true captions, with chance (captions of other held-out images, shuffled) beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.caption import (
    CAPTION_MAP_NAME,
    CaptionMap,
    GitCaptioner,
    caption_words,
    corpus_bleu,
    image_tokens_as_input,
    load_git_captioner,
)
from rtdecoder.errors import ConfigError, DecoderError

logger = logging.getLogger(__name__)

PHANTOM_CAPTION_VERSION = 1
RECORD_NAME = "phantom_caption.json"
SHIPPED_CAPTION_DIR = Path(__file__).parent / "caption_weights"

#: Subject phrase and its possessive, by source photo (:data:`~rtdecoder.phantom.stimuli.PHOTO_CATALOGUE`).
SUBJECTS: dict[str, tuple[str, str]] = {
    "astronaut": ("the astronaut", "the astronaut's"),
    "brick": ("the brick wall", "the brick wall's"),
    "camera": ("the cameraman", "the cameraman's"),
    "chelsea": ("the cat", "the cat's"),
    "clock_motion": ("the clock", "the clock's"),
    "coffee": ("the coffee cup", "the coffee cup's"),
    "coins": ("the coins", "the coins'"),
    "grass": ("the grass", "the grass's"),
    "gravel": ("the gravel", "the gravel's"),
    "hubble_deep_field": ("the galaxies", "the galaxies'"),
    "ihc": ("the stained tissue", "the stained tissue's"),
    "moon": ("the moon", "the moon's"),
    "motorcycle_left": ("the motorcycle", "the motorcycle's"),
    "motorcycle_right": ("the motorcycle", "the motorcycle's"),
    "retina": ("the retina", "the retina's"),
    "rocket": ("the rocket", "the rocket's"),
    "china": ("the temple", "the temple's"),
    "flower": ("the flower", "the flower's"),
    "grace_hopper": ("grace hopper", "grace hopper's"),
}
#: (upper bound of the crop side / photo short side, word), smallest first.
SCALES: tuple[tuple[float, str], ...] = ((0.5, "close"), (0.7, "medium"), (math.inf, "wide"))
#: Position phrase by (row third, column third) of the crop's centre.
POSITIONS: tuple[tuple[str, str, str], ...] = (
    ("upper left", "top", "upper right"),
    ("left side", "center", "right side"),
    ("lower left", "bottom", "lower right"),
)


@dataclass(frozen=True)
class CropCaption:
    """What the phantom knows of one crop, and its caption.

    Attributes
    ----------
    subject : str
        The source photo's subject phrase (``"the cat"``).
    scale : str
        ``close``, ``medium`` or ``wide``.
    position : str
        One of :data:`POSITIONS`.
    text : str
        ``"a <scale> view of <subject's> <position>"``.
    """

    subject: str
    scale: str
    position: str
    text: str


def crop_caption(photo: str, x0_px: float, y0_px: float, side_px: float, photo_size_px: tuple[int, int]) -> CropCaption:
    """The caption of one square crop.

    Parameters
    ----------
    photo : str
        Source photo name (a key of :data:`SUBJECTS`).
    x0_px, y0_px : float
        Top-left corner of the crop box in the photo, pixels (column, row).
    side_px : float
        Edge of the crop box, photo pixels.
    photo_size_px : (int, int)
        The photo's (width, height), pixels.

    Examples
    --------
    >>> crop_caption("chelsea", 0.0, 0.0, 120.0, (451, 300)).text
    "a close view of the cat's upper left"
    >>> crop_caption("coins", 40.0, 0.0, 303.0, (384, 303)).text
    "a wide view of the coins' center"
    """
    if photo not in SUBJECTS:
        raise DecoderError(f"phantom captions: photo {photo!r}: no subject phrase (expected one of {sorted(SUBJECTS)})")
    width_px, height_px = photo_size_px
    zoom = side_px / min(width_px, height_px)
    scale = next(word for bound, word in SCALES if zoom < bound)
    column = min(int(3 * (x0_px + side_px / 2) / width_px), 2)
    row = min(int(3 * (y0_px + side_px / 2) / height_px), 2)
    subject, possessive = SUBJECTS[photo]
    position = POSITIONS[row][column]
    return CropCaption(subject, scale, position, f"a {scale} view of {possessive} {position}")


def bank_captions(bank: Any, indices: Sequence[int] | np.ndarray | None = None) -> list[CropCaption]:
    """Captions of a :class:`~rtdecoder.phantom.stimuli.StimulusBank`'s crops (default all, bank order)."""
    chosen = range(len(bank)) if indices is None else [int(i) for i in np.asarray(indices).reshape(-1)]
    # the bank keeps its decoded photos; their sizes are what the crop boxes are measured against
    sizes = {name: image.size for name, image in bank._photos.items()}
    out = []
    for i in chosen:
        r = bank.records[i]
        out.append(crop_caption(r.photo, r.x0_px, r.y0_px, r.side_px, sizes[r.photo]))
    return out


def caption_vocabulary() -> list[str]:
    """Every word a phantom caption can hold (the captioner's word-piece vocabulary, after the special tokens)."""
    words: set[str] = {"a", "view", "of", "'", "s"}
    words.update(word for _bound, word in SCALES)
    for phrases in (*SUBJECTS.values(), *POSITIONS):
        for phrase in phrases:
            words.update(caption_words(phrase))
    return sorted(words)


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
    """``(subject, scale, position)`` named in a caption; each ``None`` unless exactly one is found.

    Examples
    --------
    >>> parse_caption("a close view of the cat's upper left")
    ('the cat', 'close', 'upper left')
    >>> parse_caption("a view of the moon")
    ('the moon', None, None)
    """
    padded = " " + " ".join(caption_words(text)) + " "

    def only(phrases: set[str]) -> str | None:
        # the longest phrases first, each found one removed, so "the coffee cup" does not also count as shorter ones
        remaining, found = padded, []
        for phrase in sorted(phrases, key=len, reverse=True):
            needle = " " + " ".join(caption_words(phrase)) + " "
            if needle in remaining:
                found.append(phrase)
                remaining = remaining.replace(needle, " ")
        return found[0] if len(found) == 1 else None

    return (only({s for s, _ in SUBJECTS.values()}), only({w for _, w in SCALES}),
            only({p for row in POSITIONS for p in row}))


def caption_metrics(predicted: Sequence[str], truth: Sequence[CropCaption]) -> dict[str, float]:
    """Exact-subject, scale and position accuracy, exact-caption rate and corpus BLEU-4 of some captions.

    Parameters
    ----------
    predicted : sequence of str
        One decoded caption per image.
    truth : sequence of CropCaption
        The true captions, row for row.

    Returns
    -------
    dict
        ``n``, ``subject_accuracy``, ``scale_accuracy``, ``position_accuracy``, ``exact_caption``
        (shares in [0, 1]) and ``bleu4`` (in [0, 1]).
    """
    if len(predicted) != len(truth):
        raise ConfigError(f"caption_metrics: {len(predicted)} captions but {len(truth)} true ones")
    parsed = [parse_caption(text) for text in predicted]
    n = max(len(truth), 1)
    return {
        "n": len(truth),
        "subject_accuracy": sum(p[0] == t.subject for p, t in zip(parsed, truth, strict=True)) / n,
        "scale_accuracy": sum(p[1] == t.scale for p, t in zip(parsed, truth, strict=True)) / n,
        "position_accuracy": sum(p[2] == t.position for p, t in zip(parsed, truth, strict=True)) / n,
        "exact_caption": sum(" ".join(caption_words(p)) == " ".join(caption_words(t.text))
                             for p, t in zip(predicted, truth, strict=True)) / n,
        "bleu4": corpus_bleu(list(predicted), [t.text for t in truth]),
    }


def chance_metrics(truth: Sequence[CropCaption], n_permutations: int = 20, seed: int = 0) -> dict[str, float]:
    """The metrics of well-formed captions of the wrong images: the true captions shuffled among the images.

    A captioner that ignored its input but knew the captions' distribution would score this; the
    mean over ``n_permutations`` shuffles (derangements are not enforced: an image may keep its own).
    Also ``subject_uniform``: 1 / the number of subjects.
    """
    rng = np.random.default_rng(seed)
    runs = [caption_metrics([truth[i].text for i in rng.permutation(len(truth))], truth)
            for _ in range(n_permutations)]
    mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0] if key != "n"}
    return {"n": len(truth), **mean, "subject_uniform": 1.0 / len({s for s, _ in SUBJECTS.values()})}


# --------------------------------------------------------------------------------------- the captioner


def caption_split(config: RTDecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Bank rows the phantom captioner trains on, and the held-out ones.

    Held out are the experiment's test images (the first ``experiment.n_test_images`` stimuli,
    shown to every subject and never trained on by the decoder either), so captions decoded from
    their betas are of images neither model saw; with fewer than 2 test images, the last tenth.
    """
    n = config.phantom.n_stimuli
    n_held = config.experiment.n_test_images if config.experiment.n_test_images >= 2 else max(2, round(0.1 * n))
    if n - n_held < 2:
        raise ConfigError(f"phantom captions: phantom.n_stimuli ({n}) leaves fewer than 2 training crops after "
                          f"{n_held} held-out ones")
    if config.experiment.n_test_images >= 2:
        return np.arange(n_held, n), np.arange(n_held)
    return np.arange(n - n_held), np.arange(n - n_held, n)


def phantom_caption_key(config: RTDecoderConfig) -> str:
    """Short hash of everything the phantom captioner's weights depend on."""
    relevant = {
        "phantom": config.phantom.model_dump(mode="json"),
        "embedding": config.embedding.model_dump(mode="json", exclude={"cache_dir"}),
        "n_test_images": config.experiment.n_test_images,
        "caption": config.caption.model_dump(
            mode="json", include={"phantom_train_steps", "phantom_batch_size", "phantom_lr", "phantom_hidden_dim"}),
        "version": PHANTOM_CAPTION_VERSION,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def phantom_caption_folder(config: RTDecoderConfig) -> Path:
    """Where the phantom captioner for this config lives: shipped with the package when its key matches,
    else under ``caption.cache_dir`` (trained there on first use)."""
    name = f"phantom-caption-{phantom_caption_key(config)}"
    shipped = SHIPPED_CAPTION_DIR / name
    if (shipped / CAPTION_MAP_NAME).is_file():
        return shipped
    return Path(config.caption.cache_dir) / name


def new_phantom_captioner(token_shape: tuple[int, int], hidden_dim: int, seed: int = 0) -> tuple[Any, Any, CaptionMap]:
    """An untrained phantom GIT, its tokenizer and caption map.

    Parameters
    ----------
    token_shape : (int, int)
        ``(n_tokens, token_dim)`` of the embedder's tokens (49 x 1280 for EfficientNet-Lite0).
    hidden_dim : int
        Width of the text decoder and of the map's output tokens.
    seed : int, default=0
        Seed of the initial weights.

    Returns
    -------
    model : transformers.GitForCausalLM
        2 layers, ``hidden_dim / 32`` heads; its image "encoder" has no layers (it is bypassed:
        the map's ``side^2 + 1`` tokens stand for its output, ``side = round(sqrt(n_tokens))``).
    tokenizer : transformers.BertTokenizer
        Over :func:`caption_vocabulary`.
    caption_map : CaptionMap
        ``token_shape -> (side^2 + 1, hidden_dim)``.
    """
    from transformers import BertTokenizer, GitConfig, GitForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        vocab = Path(folder) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *caption_vocabulary()]) + "\n")
        tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
    side = max(1, round(math.sqrt(token_shape[0])))
    heads = max(1, hidden_dim // 32)
    git_config = GitConfig(
        vision_config={"hidden_size": hidden_dim, "intermediate_size": hidden_dim, "num_hidden_layers": 0,
                       "num_attention_heads": 1, "image_size": side, "patch_size": 1},
        vocab_size=len(tokenizer), hidden_size=hidden_dim, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=4 * hidden_dim, max_position_embeddings=32,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GitForCausalLM(git_config)
        caption_map = CaptionMap(tuple(token_shape), (side * side + 1, hidden_dim))
    return model, tokenizer, caption_map


def train_phantom_captioner(
    tokens: np.ndarray,
    captions: Sequence[str],
    config: RTDecoderConfig,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, Any, CaptionMap, list[float]]:
    """Train a phantom GIT and its caption map together, teacher-forced on the true captions.

    Parameters
    ----------
    tokens : ndarray of shape (N, n_tokens, token_dim)
        The embedder's tokens of the training crops.
    captions : sequence of str
        Their captions, row for row.
    config : RTDecoderConfig
        ``caption.phantom_*`` (steps, batch size, learning rate, width).
    seed : int, default=0
    progress : bool, default=True

    Returns
    -------
    model, tokenizer, caption_map
        See :func:`new_phantom_captioner`; in eval mode.
    losses : list of float
        Cross-entropy per step (nats per caption token).
    """
    section = config.caption
    x_all = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))
    model, tokenizer, caption_map = new_phantom_captioner(tuple(x_all.shape[1:]), section.phantom_hidden_dim, seed)
    encoded = tokenizer(list(captions), padding=True, return_tensors="pt")
    ids_all, mask_all = encoded["input_ids"], encoded["attention_mask"]
    labels_all = ids_all.masked_fill(mask_all == 0, -100)  # no loss on padding
    parameters = [*model.parameters(), *caption_map.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=section.phantom_lr, weight_decay=0.01)
    steps = section.phantom_train_steps
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1.0 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    caption_map.train()
    losses = []
    threads = torch.get_num_threads()
    # its matrices are small: one thread is about as fast, and far faster on a machine whose cores are busy
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout's draws: the same data and seed give the same captioner
            _train_steps(model, caption_map, optimiser, schedule, parameters, x_all, ids_all, mask_all, labels_all,
                         section.phantom_batch_size, steps, generator, losses, progress)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tokenizer, caption_map.eval(), losses


def _train_steps(model: Any, caption_map: CaptionMap, optimiser: Any, schedule: Any, parameters: list, x_all: Any,
                 ids_all: Any, mask_all: Any, labels_all: Any, batch_size: int, steps: int, generator: Any,
                 losses: list[float], progress: bool) -> None:
    from tqdm import tqdm

    with image_tokens_as_input(model):
        for _ in tqdm(range(steps), desc="phantom captioner", disable=not progress):
            rows = torch.randint(len(x_all), (batch_size,), generator=generator)
            out = model(input_ids=ids_all[rows], attention_mask=mask_all[rows],
                        pixel_values=caption_map(x_all[rows])[:, None], labels=labels_all[rows])
            optimiser.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(float(out.loss.detach()))


def phantom_caption_data(config: RTDecoderConfig, indices: np.ndarray, progress: bool = True
                         ) -> tuple[np.ndarray, list[CropCaption]]:
    """The embedder's (cached) tokens of some bank rows, shape (N, n_tokens, token_dim), and their captions."""
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.embedding.cache import EmbeddingCache
    from rtdecoder.phantom.stimuli import StimulusBank

    ph = config.phantom
    bank = StimulusBank.build(ph.n_stimuli, size_px=ph.image_size_px, seed=ph.seed)
    # the whole bank's embedding is the one every other part caches; index it rather than cache a subset
    embedding = EmbeddingCache(config.embedding.cache_dir).get_or_compute(make_embedder(config.embedding), bank,
                                                                          progress=progress)
    return np.asarray(embedding.tokens[indices], dtype=np.float32), bank_captions(bank, indices)


def load_or_train_phantom_captioner(config: RTDecoderConfig, device: str = "cpu", progress: bool = True
                                    ) -> GitCaptioner:
    """The phantom world's captioner, trained on first use and cached as a captioner folder.

    The folder (:func:`phantom_caption_folder`) is what a lab's ``caption.git_weights_dir`` holds:
    ``config.json`` and weights of a GIT model, its tokenizer, ``caption_map.safetensors``, plus
    ``phantom_caption.json`` (the key, the training record). It is loaded through
    :func:`rtdecoder.decode.caption.load_git_captioner` with ``caption.max_new_tokens`` and
    ``caption.num_beams``.
    """
    folder = phantom_caption_folder(config)
    if not (folder / CAPTION_MAP_NAME).is_file():
        train_rows, held_rows = caption_split(config)
        tokens, captions = phantom_caption_data(config, train_rows, progress)
        logger.info("training the phantom captioner on %d crops (cached in %s)", len(captions), folder)
        started = time.perf_counter()
        model, tokenizer, caption_map, losses = train_phantom_captioner(
            tokens, [c.text for c in captions], config, seed=config.phantom.seed, progress=progress)
        save_phantom_captioner(folder, model, tokenizer, caption_map, {
            "key": phantom_caption_key(config), "n_train": len(captions), "n_held_out": len(held_rows),
            "train_s": round(time.perf_counter() - started, 1), "final_loss": round(float(np.mean(losses[-50:])), 4),
        })
    return load_git_captioner(folder, max_new_tokens=config.caption.max_new_tokens,
                              num_beams=config.caption.num_beams, device=device)


def save_phantom_captioner(folder: str | Path, model: Any, tokenizer: Any, caption_map: CaptionMap,
                           record: dict[str, Any]) -> Path:
    """Write a captioner folder: GIT (``save_pretrained``), tokenizer, caption map and ``phantom_caption.json``.

    Written to a temporary sibling and renamed, so an interrupted run leaves no half-written folder.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    caption_map.save(partial / CAPTION_MAP_NAME, {"source": "phantom embedder tokens", "target": "phantom GIT"})
    (partial / RECORD_NAME).write_text(json.dumps({"version": PHANTOM_CAPTION_VERSION, **record}, indent=2) + "\n")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def caption_tokens(captioner: GitCaptioner, tokens: np.ndarray | torch.Tensor, batch_size: int = 64) -> list[str]:
    """Captions of many token sets of shape (N, n_tokens, token_dim), ``batch_size`` at a time."""
    out: list[str] = []
    for start in range(0, len(tokens), batch_size):
        out.extend(captioner.caption(torch.as_tensor(np.asarray(tokens[start:start + batch_size], np.float32))))
    return out


# --------------------------------------------------------------------------------------- evaluation


def decoded_test_tokens(config: RTDecoderConfig, work_dir: Path, subject: int, progress: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Prior tokens of the test images decoded from one phantom subject's betas (repeats averaged).

    A MindEye2 model is trained on the subject's simulated training betas (every session, test
    images left out; :func:`rtdecoder.calibration.pretrain.pretrain` on that one subject, cached in
    ``work_dir``), its test-image betas are z-scored per session with the training trials'
    statistics and averaged over their repeats, and the diffusion prior is sampled from them
    (``model.prior_sample_steps``, ``prior_sample_eta``, seed 0), as the live decoder does.

    Returns
    -------
    stim_index : ndarray of shape (n_images,), int64
        Bank rows of the test images.
    tokens : ndarray of shape (n_images, n_tokens, token_dim), float32
        The prior's tokens.
    record : dict
        Trials used and seconds taken.
    """
    from rtdecoder.calibration.calibrate import average_repeats
    from rtdecoder.calibration.dataset import test_trial_betas
    from rtdecoder.calibration.pretrain import pretrain, subject_id
    from rtdecoder.decode.engine import sample_prior
    from rtdecoder.decode.model import MindEye2
    from rtdecoder.engines.torch_backend import TorchEngine
    from rtdecoder.phantom.world import PhantomWorld

    started = time.perf_counter()
    world = PhantomWorld(config, progress=progress)
    sid = subject_id(subject)
    model_dir = pretrain(config, work_dir / f"model-{sid}", subjects=[subject], world=world, progress=progress)
    train_s = time.perf_counter() - started
    data = world.pretraining_source([subject]).load(progress=progress).subjects[sid]
    test_betas, test_stim_ids = test_trial_betas(data)
    stim_ids, mean_betas = average_repeats(test_betas, test_stim_ids)
    engine = TorchEngine(MindEye2.from_pretrained(model_dir), sid)
    with torch.no_grad():
        encoded = engine.encode(torch.from_numpy(mean_betas.astype(np.float32)))
        tokens = sample_prior(engine, encoded.backbone_tokens, config.model.prior_sample_steps,
                              eta=config.model.prior_sample_eta, seed=0)
    index = np.array([world.bank.index_of(s) for s in stim_ids], dtype=np.int64)
    record = {"subject": sid, "n_test_trials": len(test_betas), "n_images": len(stim_ids),
              "model_s": round(train_s, 1), "total_s": round(time.perf_counter() - started, 1)}
    return index, tokens.float().cpu().numpy(), record


def evaluate_phantom_captions(config: RTDecoderConfig, betas: bool = False, subject: int | None = None,
                              work_dir: str | Path = "rtdecoder-cache/caption-eval", progress: bool = True
                              ) -> dict[str, Any]:
    """The phantom captioner's metrics on the held-out images, with chance (docs/captions.md).

    Parameters
    ----------
    config : RTDecoderConfig
    betas : bool, default=False
        Also caption the held-out images' tokens decoded from a subject's betas
        (:func:`decoded_test_tokens`; needs ``experiment.n_test_images`` >= 2).
    subject : int, optional
        0-based phantom subject for ``betas``; default the last one (the demo's held-out subject).
    work_dir : str or Path
        Cache of the decoding model.
    progress : bool, default=True

    Returns
    -------
    dict
        ``rows``: ``{"true tokens": metrics, "chance": metrics[, "decoded from betas": metrics]}``,
        ``examples`` (a few held-out captions, true and decoded), ``seconds``, ``captioner``.
    """
    started = time.perf_counter()
    captioner = load_or_train_phantom_captioner(config, progress=progress)
    captioner_s = time.perf_counter() - started
    _train_rows, held_rows = caption_split(config)
    tokens, truth = phantom_caption_data(config, held_rows, progress)
    started = time.perf_counter()
    from_true = caption_tokens(captioner, tokens)
    caption_ms = 1000 * (time.perf_counter() - started) / max(len(tokens), 1)
    single_ms = caption_latency_ms(captioner, tokens[:40])
    rows: dict[str, Any] = {"true tokens": caption_metrics(from_true, truth), "chance": chance_metrics(truth)}
    examples = [{"true": t.text, "from true tokens": p} for t, p in zip(truth[:5], from_true[:5], strict=True)]
    record: dict[str, Any] = {}
    if betas:
        if config.experiment.n_test_images < 2:
            raise ConfigError("phantom captions: --betas needs experiment.n_test_images >= 2 (the decoded test images)")
        subject = config.phantom.n_subjects - 1 if subject is None else subject
        index, decoded, record = decoded_test_tokens(config, Path(work_dir), subject, progress)
        row_of = {int(r): k for k, r in enumerate(held_rows)}
        decoded_truth = [truth[row_of[int(i)]] for i in index]
        from_betas = caption_tokens(captioner, decoded)
        rows["decoded from betas"] = caption_metrics(from_betas, decoded_truth)
        rows["chance (decoded images)"] = chance_metrics(decoded_truth)
        for example in examples:
            example["from betas"] = next((p for p, t in zip(from_betas, decoded_truth, strict=True)
                                          if t.text == example["true"]), None)
    folder = phantom_caption_folder(config)
    trained = json.loads((folder / RECORD_NAME).read_text()) if (folder / RECORD_NAME).is_file() else {}
    return {"config": config.name, "rows": rows, "examples": examples, "decoding": record,
            "captioner": {"folder": str(folder), **trained, "max_new_tokens": captioner.max_new_tokens,
                          "num_beams": captioner.num_beams, "caption_ms_per_image_batched": round(caption_ms, 2),
                          "caption_ms_one_image_median": round(float(np.median(single_ms)), 2),
                          "caption_ms_one_image_p95": round(float(np.percentile(single_ms, 95)), 2),
                          "torch_threads": torch.get_num_threads()},
            "seconds": {"captioner_load_or_train": round(captioner_s, 1)}}


def caption_latency_ms(captioner: GitCaptioner, tokens: np.ndarray) -> np.ndarray:
    """Milliseconds to caption each token set alone, as a live decode does (after one warm-up caption)."""
    captioner.caption(torch.as_tensor(tokens[:1]))
    times = []
    for row in tokens:
        started = time.perf_counter()
        captioner.caption(torch.as_tensor(row[None]))
        times.append(1000 * (time.perf_counter() - started))
    return np.asarray(times)


def format_caption_table(result: dict[str, Any]) -> str:
    """The metric rows as a Markdown table (percentages; BLEU-4 x 100)."""
    lines = ["| tokens captioned | images | exact subject | scale | position | exact caption | BLEU-4 |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["rows"].items():
        subject = f"{100 * m['subject_accuracy']:.1f}%"
        if "subject_uniform" in m:
            subject += f" (1/{round(1 / m['subject_uniform'])}: {100 * m['subject_uniform']:.1f}%)"
        shares = " | ".join(f"{100 * m[k]:.1f}%" for k in ("scale_accuracy", "position_accuracy", "exact_caption"))
        lines.append(f"| {name} | {m['n']} | {subject} | {shares} | {100 * m['bleu4']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtdecoder.phantom.captions evaluate``: the phantom captioner's metric table."""
    parser = argparse.ArgumentParser(prog="python -m rtdecoder.phantom.captions", description=__doc__.split("\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    evaluate = actions.add_parser("evaluate", help="metrics of the phantom captioner on the held-out images")
    evaluate.add_argument("--config", default="phantom", help="a preset or YAML file")
    evaluate.add_argument("--betas", action="store_true", help="also caption tokens decoded from a subject's betas")
    evaluate.add_argument("--subject", type=int, help="0-based phantom subject for --betas (default the last)")
    evaluate.add_argument("--work", default="rtdecoder-cache/caption-eval", help="cache of the decoding model")
    evaluate.add_argument("--out", default="bench/results/captions.json", help="JSON of the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from rtdecoder.config import load_config

    result = evaluate_phantom_captions(load_config(args.config), betas=args.betas, subject=args.subject,
                                       work_dir=args.work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_caption_table(result))
    c = result["captioner"]
    print(f"one caption alone: {c['caption_ms_one_image_median']:.1f} ms median, "
          f"{c['caption_ms_one_image_p95']:.1f} ms p95 ({c['num_beams']} beam(s), {c['max_new_tokens']}-token budget, "
          f"{c['torch_threads']} torch threads)")
    for example in result["examples"]:
        print(" | ".join(f"{k}: {v}" for k, v in example.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
