"""The caption stage: predicted image tokens -> a linear map -> a GIT captioner -> text.

MindEye2 captions the seen image from the diffusion prior's output: a linear map takes the 256x1664
OpenCLIP bigG tokens to the 257x1024 CLIP ViT-L/14 tokens that GIT-large-COCO's own image encoder
would give, and GIT decodes them into about 20 word pieces (docs/mindeye2.md). This module holds

* :class:`CaptionMap`, the map: separable, as MindEye2's ``CLIPConverter`` is (one linear layer
  mixes the tokens, ``T_in -> T_out``, a second one maps each token's features, ``D_in -> D_out``);
  saved and loaded as a safetensors file (:func:`load_caption_map` also reads MindEye2's
  ``linear1`` / ``linear2`` names), or fitted by ridge regression from paired tokens of the same
  images (:func:`fit_caption_map`), when a lab has both embedders' tokens for its images;
* :class:`GitCaptioner`, a ``transformers`` :class:`~transformers.GitForCausalLM` whose image
  encoder is bypassed (the mapped tokens *are* its output, as in MindEye2's ``GitForCausalLMClipEmb``),
  decoding greedily or by beam search within a token budget (``caption.max_new_tokens``);
* :func:`load_git_captioner`, which reads both from local files (nothing is downloaded);
* :func:`corpus_bleu`, corpus BLEU-4 (Papineni et al. 2002) to score captions against references.

The map is fitted once from the command line::

    python -m rtdecoder.decode.caption fit-map --source bigG.safetensors --target git_vit_l.safetensors \\
        --out caption_map.safetensors

with two embeddings files of the same images (``ids`` matched; rtdecoder/embedding/cache.py): the
predicted embedder's tokens (``--source``) and the captioner's own image-encoder tokens (``--target``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

CAPTION_MAP_FORMAT = "rtdecoder-caption-map/1"
#: The map's file name beside a captioner's weights when ``caption.map_path`` is not set.
CAPTION_MAP_NAME = "caption_map.safetensors"
# Tensor names of a map file: ours, then MindEye2's CLIPConverter (linear1 mixes tokens, linear2 features).
_MAP_KEYS = (("token_map.weight", "token_map.bias", "dim_map.weight", "dim_map.bias"),
             ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"))


class Captioner(Protocol):
    """Predicted image tokens -> one caption per image (what :class:`~rtdecoder.decode.live.LiveDecoder` needs)."""

    name: str

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(n_tokens, token_dim)`` of the tokens it takes (the decoder's model must predict these)."""

    def caption(self, tokens: torch.Tensor) -> list[str]:
        """Captions of a batch of token sets of shape (B, n_tokens, token_dim)."""


class CaptionMap(nn.Module):
    """A separable linear map of token sets: ``(T_in, D_in) -> (T_out, D_out)``.

    ``y = dim_map(token_map(x^T)^T)``: ``token_map`` mixes the tokens (each output token a weighted
    sum of the input tokens plus a bias), ``dim_map`` maps every token's features. MindEye2's
    ``CLIPConverter`` is this map (256 -> 257 tokens, 1664 -> 1024 features), with about
    ``T_in T_out + D_in D_out`` weights instead of the ``T_in D_in T_out D_out`` of a full map.

    Parameters
    ----------
    in_shape : (int, int)
        ``(T_in, D_in)``: tokens and features per token of the input (the decoder's prediction).
    out_shape : (int, int)
        ``(T_out, D_out)``: those of the captioner's image-encoder output.
    """

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int]) -> None:
        super().__init__()
        (n_in, d_in), (n_out, d_out) = in_shape, out_shape
        self.token_map = nn.Linear(n_in, n_out)
        self.dim_map = nn.Linear(d_in, d_out)

    @property
    def in_shape(self) -> tuple[int, int]:
        """``(T_in, D_in)``."""
        return self.token_map.in_features, self.dim_map.in_features

    @property
    def out_shape(self) -> tuple[int, int]:
        """``(T_out, D_out)``."""
        return self.token_map.out_features, self.dim_map.out_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens of shape (B, T_in, D_in) to (B, T_out, D_out)."""
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != self.in_shape:
            raise BundleError(f"caption map: expected tokens of shape (B, {self.in_shape[0]}, {self.in_shape[1]}) "
                              f"(got {tuple(tokens.shape)})")
        mixed = self.token_map(tokens.transpose(1, 2)).transpose(1, 2)  # (B, T_out, D_in)
        return self.dim_map(mixed)                                     # (B, T_out, D_out)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the map as a safetensors file (tensors ``token_map.*``, ``dim_map.*``); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"format": CAPTION_MAP_FORMAT, **(metadata or {})})
        return path


def load_caption_map(path: str | Path, key: str = "caption.map_path") -> CaptionMap:
    """Read a caption map from a safetensors file.

    Parameters
    ----------
    path : str or Path
        Tensors ``token_map.weight`` (T_out, T_in), ``token_map.bias`` (T_out,), ``dim_map.weight``
        (D_out, D_in), ``dim_map.bias`` (D_out,), as :meth:`CaptionMap.save` writes them; or MindEye2's
        ``linear1.*`` / ``linear2.*`` (its ``CLIPConverter`` state dict saved as safetensors), with
        or without a common prefix (``clip_convert.linear1.weight``).
    key : str, default="caption.map_path"
        The config key named in errors.

    Returns
    -------
    CaptionMap
        In eval mode, float32.

    Raises
    ------
    BundleError
        A missing or unreadable file, missing tensors, or shapes that do not fit together.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{key}: {path}: no such file (a safetensors caption map)")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise BundleError(f"{key}: {path}: cannot read the caption map: {err}") from None
    for names in _MAP_KEYS:
        found = [next((k for k in state if k == name or k.endswith("." + name)), None) for name in names]
        if all(found):
            tw, tb, dw, db = (state[k].float() for k in found)
            break
    else:
        raise BundleError(f"{key}: {path}: expected tensors {', '.join(_MAP_KEYS[0])} (or MindEye2's "
                          f"{', '.join(_MAP_KEYS[1])}); found {', '.join(sorted(state)) or 'none'}")
    if tw.ndim != 2 or dw.ndim != 2 or tb.shape != (tw.shape[0],) or db.shape != (dw.shape[0],):
        raise BundleError(f"{key}: {path}: token map {tuple(tw.shape)} + {tuple(tb.shape)} and feature map "
                          f"{tuple(dw.shape)} + {tuple(db.shape)}: expected (T_out, T_in) + (T_out,), (D_out, D_in) + "
                          "(D_out,)")
    caption_map = CaptionMap((tw.shape[1], dw.shape[1]), (tw.shape[0], dw.shape[0]))
    caption_map.load_state_dict({"token_map.weight": tw, "token_map.bias": tb, "dim_map.weight": dw,
                                 "dim_map.bias": db})
    return caption_map.eval()


def fit_caption_map(
    source: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    ridge: float = 1e-3,
    n_iterations: int = 5,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> CaptionMap:
    """Fit a :class:`CaptionMap` by ridge regression from paired tokens of the same images.

    The separable map is bilinear in its two weight matrices, so it is fitted by alternating
    ridge regressions, each in closed form: the feature map given the token map, then the token
    map given the feature map, ``n_iterations`` times, then the feature map once more. The token
    map starts as a linear resampling of the token index (the identity when ``T_in == T_out``), so
    token grids that line up start aligned.

    Parameters
    ----------
    source : array of shape (N, T_in, D_in)
        The predicted embedder's tokens (e.g. OpenCLIP bigG, 256 x 1664), float16 or float32; a
        memory map is read ``batch_size`` rows at a time.
    target : array of shape (N, T_out, D_out)
        The captioner's image-encoder tokens of the same images, row for row (GIT's CLIP ViT-L/14
        output, 257 x 1024: ``model.git.image_encoder(pixel_values).last_hidden_state``).
    ridge : float, default=1e-3
        Penalty relative to the mean eigenvalue of each step's Gram matrix (its trace over its
        size), so that it does not depend on the tokens' scale; biases are not penalised.
    n_iterations : int, default=5
        Alternations (each one pass over the data per step).
    batch_size : int, default=64
        Images per chunk (bounds memory: ``batch_size * T_out * max(D_in, D_out)`` floats).
    device : str or torch.device, default="cpu"
        Where the chunks' Gram matrices are computed (sums are kept in float64).

    Returns
    -------
    CaptionMap
        In eval mode, float32, on the CPU.

    Raises
    ------
    ConfigError
        Arrays of other ranks, different numbers of images, fewer than 2 images, or a negative ridge.
    """
    n, n_in, d_in = _shape3(source, "source")
    n_target, n_out, d_out = _shape3(target, "target")
    if n != n_target or n < 2:
        raise ConfigError(f"fit_caption_map: expected the same number (>= 2) of source and target images "
                          f"(got {n} and {n_target})")
    if ridge < 0 or n_iterations < 0 or batch_size < 1:
        raise ConfigError(f"fit_caption_map: expected ridge >= 0, n_iterations >= 0, batch_size >= 1 (got {ridge}, "
                          f"{n_iterations}, {batch_size})")
    device = torch.device(device)
    token_w = _resampling(n_out, n_in).to(device)   # (T_out, T_in)
    token_b = torch.zeros(n_out, dtype=torch.float64, device=device)

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, n, batch_size):
            x = torch.as_tensor(np.asarray(source[start:start + batch_size], dtype=np.float32), device=device)
            y = torch.as_tensor(np.asarray(target[start:start + batch_size], dtype=np.float32), device=device)
            yield x, y

    def fit_features() -> tuple[torch.Tensor, torch.Tensor]:
        # rows z = (token-mixed input) of every token of every image -> rows y of the target
        gram = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=device)
        cross = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=device)
        for x, y in chunks():
            z = torch.einsum("oi,nid->nod", token_w.float(), x) + token_b.float()[None, :, None]
            z = torch.cat([z.reshape(-1, d_in), torch.ones(z.shape[0] * n_out, 1, device=device)], dim=1)
            gram += (z.T @ z).double()
            cross += (z.T @ y.reshape(-1, d_out)).double()
        solution = _ridge_solve(gram, cross, ridge)  # (D_in + 1, D_out)
        return solution[:d_in].T, solution[d_in]

    def fit_tokens(dim_w: torch.Tensor, dim_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # y[t, k] - b[k] = sum_j W_t[t, j] u[j, k] + b_t[t] s[k], with u = x W_d^T and s = W_d 1:
        # one regression of T_out targets on T_in + 1 features per (image, output feature) pair
        s = dim_w.float().sum(dim=1)  # (D_out,)
        gram = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64, device=device)
        cross = torch.zeros(n_in + 1, n_out, dtype=torch.float64, device=device)
        for x, y in chunks():
            u = x @ dim_w.float().T                                            # (n, T_in, D_out)
            f = torch.cat([u, s.expand(u.shape[0], 1, d_out)], dim=1)          # (n, T_in + 1, D_out)
            g = y - dim_b.float()                                              # (n, T_out, D_out)
            gram += torch.einsum("nak,nbk->ab", f, f).double()
            cross += torch.einsum("nak,nok->ao", f, g).double()
        solution = _ridge_solve(gram, cross, ridge)  # (T_in + 1, T_out)
        return solution[:n_in].T, solution[n_in]

    started = time.perf_counter()
    dim_w, dim_b = fit_features()
    for _ in range(n_iterations):
        token_w, token_b = fit_tokens(dim_w, dim_b)
        dim_w, dim_b = fit_features()
    logger.info("caption map (%d, %d) -> (%d, %d) fitted on %d images in %.1f s", n_in, d_in, n_out, d_out, n,
                time.perf_counter() - started)
    caption_map = CaptionMap((n_in, d_in), (n_out, d_out))
    caption_map.load_state_dict({"token_map.weight": token_w.float().cpu(), "token_map.bias": token_b.float().cpu(),
                                 "dim_map.weight": dim_w.float().cpu(), "dim_map.bias": dim_b.float().cpu()})
    return caption_map.eval()


def _shape3(array: Any, name: str) -> tuple[int, int, int]:
    shape = tuple(array.shape)
    if len(shape) != 3:
        raise ConfigError(f"fit_caption_map: {name}: expected tokens of shape (N, T, D) (got {shape})")
    return shape  # type: ignore[return-value]


def _resampling(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) linear interpolation along the token index: the identity when the counts agree."""
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    positions = torch.linspace(0, n_in - 1, n_out, dtype=torch.float64) if n_out > 1 else torch.zeros(1)
    for row, position in enumerate(positions.tolist()):
        low = min(int(math.floor(position)), n_in - 1)
        high = min(low + 1, n_in - 1)
        weights[row, low] += 1.0 - (position - low)
        weights[row, high] += position - low
    return weights


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (G + lambda P) w = c, the last row/column being the unpenalised bias feature."""
    size = gram.shape[0] - 1
    penalty = ridge * float(torch.trace(gram[:size, :size])) / max(size, 1)
    diagonal = torch.full((size + 1,), penalty, dtype=gram.dtype, device=gram.device)
    diagonal[size] = 0.0
    # a tiny floor keeps the solve defined for ridge=0 with collinear features
    diagonal += 1e-12 * float(torch.trace(gram)) / (size + 1)
    return torch.linalg.solve(gram + torch.diag(diagonal), cross)


@dataclass
class _EncoderOutput:
    last_hidden_state: torch.Tensor


class _GivenImageTokens(nn.Module):
    """Stands in for GIT's image encoder: its input, shape (B, 1, T, D), already is the encoder's output."""

    def forward(self, pixel_values: torch.Tensor, **_kwargs: Any) -> _EncoderOutput:
        return _EncoderOutput(pixel_values[:, 0])


@contextmanager
def image_tokens_as_input(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` (a GitForCausalLM) takes image-encoder tokens as ``pixel_values[:, None]``.

    For training a captioner on given tokens while keeping its own image encoder for saving.
    """
    original = model.git.image_encoder
    model.git.image_encoder = _GivenImageTokens()
    try:
        yield model
    finally:
        model.git.image_encoder = original


class GitCaptioner:
    """Caption predicted image tokens with GIT (``transformers.GitForCausalLM``) through a :class:`CaptionMap`.

    GIT's own image encoder (CLIP ViT-L/14 in GIT-large) is dropped: the mapped tokens stand for its
    output, so its weights are not kept in memory once the model is built.

    Parameters
    ----------
    model : transformers.GitForCausalLM
        The captioner; put in eval mode, its image encoder replaced.
    tokenizer : transformers tokenizer
        GIT's (a BERT word-piece tokenizer): decodes the generated ids.
    caption_map : CaptionMap
        Predicted tokens -> GIT image-encoder tokens; ``out_shape`` must be GIT's
        ``(image_patch_tokens, vision_config.hidden_size)``.
    max_new_tokens : int, default=20
        Token budget of one caption: generation stops there if no end token came first.
    num_beams : int, default=1
        1: greedy decoding; more: beam search of that width. Both are deterministic.
    name : str, default="git"
        Named in logs.

    Raises
    ------
    BundleError
        When the map's output does not fit GIT's image tokens.
    """

    def __init__(self, model: Any, tokenizer: Any, caption_map: CaptionMap, max_new_tokens: int = 20,
                 num_beams: int = 1, name: str = "git") -> None:
        if max_new_tokens < 1 or num_beams < 1:
            raise ConfigError(f"caption: expected max_new_tokens >= 1 and num_beams >= 1 (got {max_new_tokens}, "
                              f"{num_beams})")
        n_image_tokens = model.git.encoder.layer[0].attention.self.image_patch_tokens
        vision_dim = model.config.vision_config.hidden_size
        if caption_map.out_shape != (n_image_tokens, vision_dim):
            raise BundleError(
                f"caption map: gives tokens of shape {caption_map.out_shape} but captioner {name!r} takes "
                f"{(n_image_tokens, vision_dim)} (its image encoder's output); fit or load a map for this captioner"
            )
        model.git.image_encoder = _GivenImageTokens()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.caption_map = caption_map.eval()
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        self.name = name
        config = model.config
        self._special = {
            "bos_token_id": _first(config.bos_token_id, tokenizer.cls_token_id),
            "eos_token_id": _first(config.eos_token_id, tokenizer.sep_token_id),
            "pad_token_id": _first(config.pad_token_id, tokenizer.pad_token_id),
        }

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(n_tokens, token_dim)`` of the predicted tokens it takes."""
        return self.caption_map.in_shape

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> GitCaptioner:
        """Move the model and the map (e.g. to the decoder's GPU); returns itself."""
        self.model.to(device)
        self.caption_map.to(device)
        return self

    def generate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids of one caption per token set.

        Parameters
        ----------
        tokens : Tensor of shape (B, n_tokens, token_dim)
            Predicted image tokens (the prior's output), any float dtype.

        Returns
        -------
        Tensor of shape (B, L), int64
            The start token, then at most ``max_new_tokens`` generated ids (``L <= 1 + max_new_tokens``),
            padded after an end token.
        """
        with torch.inference_mode():
            parameter = next(self.caption_map.parameters())
            image_tokens = self.caption_map(tokens.to(device=parameter.device, dtype=parameter.dtype))
            return self.model.generate(
                pixel_values=image_tokens[:, None], max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                do_sample=False, **self._special,
            )

    def caption(self, tokens: torch.Tensor) -> list[str]:
        """One caption per token set of shape (B, n_tokens, token_dim): lower-case text, special tokens removed."""
        ids = self.generate(tokens)
        return [tidy_caption(text) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def tidy_caption(text: str) -> str:
    """Decoded word pieces as a caption: one space between words, none before punctuation, and the
    possessive rejoined (``"cat ' s"`` -> ``"cat's"``, ``"coins ' center"`` -> ``"coins' center"``).

    Examples
    --------
    >>> tidy_caption("a close view of the cat ' s  upper left .")
    "a close view of the cat's upper left."
    """
    text = " ".join(text.split())
    text = re.sub(r" ([.,!?;:])", r"\1", text)
    text = re.sub(r" ' s\b", "'s", text)
    return re.sub(r" '( |$)", r"'\1", text)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def load_git_captioner(
    weights_dir: str | Path,
    map_path: str | Path | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    device: str | torch.device = "cpu",
    key: str = "caption.git_weights_dir",
) -> GitCaptioner:
    """A :class:`GitCaptioner` from local files; nothing is downloaded.

    Parameters
    ----------
    weights_dir : str or Path
        A folder written by ``transformers`` (``save_pretrained``): ``config.json`` of a ``git`` model,
        its weights (``model.safetensors`` or ``pytorch_model.bin``) and tokenizer files (``vocab.txt``
        or ``tokenizer.json``), e.g. a local copy of GIT-large-COCO.
    map_path : str or Path, optional
        The caption map; default ``<weights_dir>/caption_map.safetensors``.
    max_new_tokens, num_beams : int
        See :class:`GitCaptioner`.
    device : str or torch.device, default="cpu"
    key : str, default="caption.git_weights_dir"
        The config key named in errors.

    Raises
    ------
    BundleError
        A folder without a GIT model or tokenizer, a missing or ill-fitting map.
    """
    folder = Path(weights_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BundleError(f"{key}: {folder}: no config.json (expected a GIT model folder saved by transformers)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{key}: {config_path}: cannot read: {err}") from None
    if model_type != "git":
        raise BundleError(f"{key}: {config_path}: model_type: expected 'git' (got {model_type!r})")
    from transformers import AutoTokenizer, GitForCausalLM

    try:
        model = GitForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BundleError(f"{key}: {folder}: cannot load the GIT captioner: {err}") from None
    caption_map = load_caption_map(map_path if map_path is not None else folder / CAPTION_MAP_NAME,
                                   key="caption.map_path")
    captioner = GitCaptioner(model, tokenizer, caption_map, max_new_tokens, num_beams, name=f"git:{folder.name}")
    return captioner.to(device)


# ----------------------------------------------------------------------------------------------- BLEU

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def caption_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks of a caption (the units BLEU counts)."""
    return _WORD.findall(text.lower())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002): geometric mean of clipped n-gram precisions, n = 1..max_n,
    times the brevity penalty; no smoothing.

    Parameters
    ----------
    hypotheses : sequence of str
        One caption per image.
    references : sequence of str, or of sequences of str
        The image's reference caption(s), row for row.
    max_n : int, default=4
        BLEU-4 by default.

    Returns
    -------
    float
        In [0, 1]; 0 when some order has no matching n-gram in the whole corpus.

    Examples
    --------
    >>> corpus_bleu(["a close view of the cat"], ["a close view of the cat"])
    1.0
    >>> round(corpus_bleu(["a view of the cat"], ["a close view of the cat"], max_n=1), 4)
    0.8187
    """
    if len(hypotheses) != len(references):
        raise ConfigError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    matched = [0] * max_n
    total = [0] * max_n
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        words = caption_words(hypothesis)
        ref_words = [caption_words(r) for r in ([refs] if isinstance(refs, str) else refs)]
        hyp_length += len(words)
        # the reference closest in length (the shorter one on a tie), as in the original definition
        ref_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            most = Counter()
            for r in ref_words:
                most |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    if hyp_length == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / hyp_length)
    return brevity * math.exp(log_precision)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtdecoder.decode.caption fit-map``: fit a caption map from two embeddings files."""
    parser = argparse.ArgumentParser(prog="python -m rtdecoder.decode.caption", description=__doc__.split("\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    fit = actions.add_parser("fit-map", help="fit the linear map predicted tokens -> captioner tokens by ridge")
    fit.add_argument("--source", required=True, help="embeddings file of the predicted embedder's tokens")
    fit.add_argument("--target", required=True, help="embeddings file of the captioner's image-encoder tokens")
    fit.add_argument("--out", required=True, help="the map to write (safetensors; caption.map_path)")
    fit.add_argument("--ridge", type=float, default=1e-3, help="penalty relative to the Gram matrices' mean eigenvalue")
    fit.add_argument("--iterations", type=int, default=5, help="alternations of the two ridge steps")
    fit.add_argument("--holdout-fraction", type=float, default=0.1, help="share of images kept out to report R^2")
    fit.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rtdecoder.embedding.cache import load_image_tokens

    source = load_image_tokens(args.source)
    target = load_image_tokens(args.target)
    target_ids = set(target.ids)
    common = [i for i in source.ids if i in target_ids]
    if len(common) < 4:
        raise ConfigError(f"fit-map: {args.source} and {args.target} share {len(common)} image ids (need >= 4)")
    n_test = int(round(len(common) * args.holdout_fraction))
    train_ids, test_ids = common[: len(common) - n_test], common[len(common) - n_test:]
    caption_map = fit_caption_map(_Rows(source, train_ids), _Rows(target, train_ids), ridge=args.ridge,
                                  n_iterations=args.iterations, device=args.device)
    report: dict[str, Any] = {"n_train": len(train_ids), "n_test": len(test_ids), "ridge": args.ridge,
                              "iterations": args.iterations}
    if test_ids:
        report["heldout_r2"] = round(map_r2(caption_map, _Rows(source, test_ids), _Rows(target, test_ids)), 4)
    caption_map.save(args.out, {"source": source.embedding_name, "target": target.embedding_name,
                                "fit": json.dumps(report)})
    print(json.dumps({"out": args.out, **report}))
    return 0


class _Rows:
    """Some images of an embeddings file, in a given order, read a slice at a time (``fit_caption_map``'s input)."""

    def __init__(self, tokens: Any, ids: Sequence[str]) -> None:
        self.tokens = tokens
        self.rows = tokens.rows(ids)
        self.shape = (len(self.rows), *tokens.token_shape)

    def __getitem__(self, index: slice) -> np.ndarray:
        return self.tokens.take(self.rows[index])


def map_r2(caption_map: CaptionMap, source: Any, target: Any, batch_size: int = 64) -> float:
    """Share of the target tokens' variance (about their mean over images) that the map explains.

    Parameters
    ----------
    caption_map : CaptionMap
    source : array of shape (N, T_in, D_in)
    target : array of shape (N, T_out, D_out)
    batch_size : int, default=64

    Returns
    -------
    float
        1 - residual sum of squares / total sum of squares (1: perfect; 0: no better than the mean).
    """
    n = source.shape[0]
    mean = sum(np.asarray(target[s:s + batch_size], np.float64).sum(axis=0) for s in range(0, n, batch_size)) / n
    residual = total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = torch.as_tensor(np.asarray(source[start:start + batch_size], dtype=np.float32))
            y = np.asarray(target[start:start + batch_size], dtype=np.float64)
            residual += float(np.sum((caption_map(x).double().numpy() - y) ** 2))
            total += float(np.sum((y - mean) ** 2))
    return 1.0 - residual / total if total > 0 else 0.0


if __name__ == "__main__":
    raise SystemExit(main())
