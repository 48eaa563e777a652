"""Several calibrations of one subject, differing only in training seed, decoded as one model.

Averaging the predictions of calibrations that differ only in ``training.seed`` retrieves better
than each of them alone (on the phantom's development subject, three seeds: +4.4 points of image
and +3.3 of brain retrieval among 300; ``bench/bench_seed_ensemble.py``, docs/calibration.md).
:class:`ModelEnsemble` is such a set behind the interface of one
:class:`~rtdecoder.decode.model.MindEye2`: its forward pass averages the members' backbone
tokens, retrieval tokens and low-level outputs, so that the torch, ONNX Runtime and TensorRT
engines, the evaluation and the live decoder run it as they run one model.

The diffusion prior is the first member's, conditioned on the averaged backbone tokens. Measured on
the development subject (300 test images, 20 DDIM steps), the cosine of the prior's samples with the
true image tokens was 0.356-0.372 for each member's own prior on its own tokens, 0.378 for the
first member's prior on the averaged tokens, and 0.379 when all three denoisers were averaged at
every step, which costs three times the prior's latency for 0.001.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rtdecoder.config import ModelConfig
from rtdecoder.decode.model import MindEye2, MindEye2Output
from rtdecoder.errors import BundleError


class ModelEnsemble(nn.Module):
    """Members of one architecture and one set of adapters, their outputs averaged.

    Parameters
    ----------
    members : sequence of MindEye2
        At least two, with equal ``config`` and ``subjects`` (calibrations of the same betas with
        different seeds).

    Raises
    ------
    BundleError
        Fewer than two members, or members of different sizes or subjects.
    """

    def __init__(self, members: Sequence[MindEye2]) -> None:
        super().__init__()
        if len(members) < 2:
            raise BundleError(f"model ensemble: expected at least 2 members (got {len(members)})")
        first = members[0]
        for index, member in enumerate(members[1:], start=1):
            if member.config != first.config or member.subjects != first.subjects:
                raise BundleError(
                    f"model ensemble: member {index}: expected the sizes and subjects of member 0 "
                    f"({first.subjects}); got {member.subjects} and "
                    f"{'the same' if member.config == first.config else 'other'} model sizes"
                )
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> ModelConfig:
        """The members' shared model sizes."""
        return self.members[0].config

    @property
    def subjects(self) -> dict[str, int]:
        """Subject id -> voxel count, as every member has them."""
        return self.members[0].subjects

    @property
    def adapters(self) -> nn.ModuleDict:
        """The first member's adapters (every member's have the same inputs)."""
        return self.members[0].adapters

    @property
    def prior(self) -> nn.Module | None:
        """The first member's diffusion prior (see the module's notes)."""
        return self.members[0].prior

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, betas: Mapping[str, torch.Tensor]) -> MindEye2Output:
        """The members' :class:`MindEye2Output`, averaged field by field."""
        outputs = [member(betas) for member in self.members]
        lowlevel = None
        if outputs[0].lowlevel is not None:
            lowlevel = torch.stack([out.lowlevel for out in outputs]).mean(dim=0)
        return MindEye2Output(
            torch.stack([out.backbone_tokens for out in outputs]).mean(dim=0),
            torch.stack([out.clip_tokens for out in outputs]).mean(dim=0),
            lowlevel,
        )


def as_members(model: MindEye2 | ModelEnsemble) -> list[MindEye2]:
    """The single models of a model or an ensemble, in order."""
    return list(model.members) if isinstance(model, ModelEnsemble) else [model]


def as_model(members: Sequence[MindEye2]) -> MindEye2 | ModelEnsemble:
    """One member as itself, several as their :class:`ModelEnsemble` (the inverse of :func:`as_members`)."""
    return members[0] if len(members) == 1 else ModelEnsemble(members)
