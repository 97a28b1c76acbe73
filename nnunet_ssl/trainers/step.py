"""One training step's shared data: built by ``nnUNetTrainerSSL.train_step`` and passed to every hook."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SSLStep:
    """What the hooks of one step read and write, instead of attributes left on the trainer.

    ``train_step`` fills the inputs; the host's ``student_input`` sets ``student_image`` (and ``mix`` if it mixes);
    two-network hosts set ``direction`` before each loss call; plug-ins add loss terms. The total is
    ``L = L_sup + sum(constant_losses) + lambda(t) L_unsup + sum(scheduled_losses)``, summed in that order.
    """

    #: labeled images (B, C, *spatial) and nnU-Net's targets (a list per deep-supervision scale, or one tensor)
    data: torch.Tensor
    target: torch.Tensor | list[torch.Tensor]
    #: aligned unlabeled views ``view0``, ``view1``, ... of the same patches
    views: dict[str, torch.Tensor]
    #: lambda(t) of this step
    lam: float
    #: the unlabeled images the student sees with gradient (after any mixing)
    student_image: torch.Tensor | None = None
    #: CutMix boxes (U, *spatial) applied to ``student_image``; the reference is mixed with the same boxes
    mix: torch.Tensor | None = None
    #: the unlabeled images the reference predicted (set by hosts whose reference sees its own input)
    reference_image: torch.Tensor | None = None
    #: per-voxel weights (U, *spatial) the host attaches to its reference (UA-MT's certainty mask): every
    #: unsupervised loss, the host's or a plug-in's, weights its voxels by them (:meth:`voxel_weights`)
    reference_weights: torch.Tensor | None = None
    #: what a host's ``reference_logits`` leaves for its own ``unsupervised_loss`` and logs (AD-MT's student
    #: prediction and teachers' conflict mask)
    host_data: object | None = None
    #: which (student, reference) pair a loss call evaluates: 0 or 1 on two-network hosts, else 0
    direction: int = 0
    #: already weighted float32 terms with a constant weight, beside L_sup (MEDL's L_wl; its L_u in the paper preset)
    constant_losses: list[torch.Tensor] = field(default_factory=list)
    #: already weighted float32 terms with a schedule of their own, outside lambda(t) (QG-SSL's QAR, MEDL's L_u)
    scheduled_losses: list[torch.Tensor] = field(default_factory=list)

    #: detached per-step values a plug-in reads again after the loss (e.g. QAR's size for its balance)
    observed: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def observe(self, name: str, value: torch.Tensor) -> None:
        self.observed.setdefault(name, []).append(value.detach())

    def voxel_weights(self, weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """A plug-in's own voxel weights times the host's ``reference_weights`` (either may be None)."""
        if self.reference_weights is None:
            return weights
        return self.reference_weights if weights is None else weights * self.reference_weights

    def add_constant_loss(self, weighted: torch.Tensor) -> None:
        self.constant_losses.append(weighted)

    def add_scheduled_loss(self, weighted: torch.Tensor) -> None:
        self.scheduled_losses.append(weighted)

    def total(self, sup_loss: torch.Tensor, unsup_loss: torch.Tensor) -> torch.Tensor:
        """``L_sup + sum(constant) + lambda L_unsup + sum(scheduled)`` in float32 (call outside autocast)."""
        loss = sup_loss.float()
        for term in self.constant_losses:
            loss = loss + term
        loss = loss + self.lam * unsup_loss
        for term in self.scheduled_losses:
            loss = loss + term
        return loss
