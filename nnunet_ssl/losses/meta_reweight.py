"""MLB-Seg's losses (Wei et al., "Consistency-guided Meta-Learning for Bootstrapping Semi-Supervised Medical Image
Segmentation", MICCAI 2023): per-voxel weights from a one-step look-ahead on clean labeled data (learning to
reweight, Ren et al., ICML 2018), pseudo-label enhancement (PLE) over geometric views, and the view consistency.

The meta-gradient. With per-voxel costs ``c(theta)`` (a tensor of any shape), an inner loss ``L_in(theta)`` and
one optimizer step ``theta^(eps) = S(theta, grad_theta [sum_i eps_i c_i(theta) + L_in(theta)])``, the gradient of
the clean loss after the step at ``eps = 0`` is, by the chain rule,

    g_i = d L_meta(theta^(eps)) / d eps_i |_0 = < grad L_meta(theta^(0)), dS/dgrad  grad_theta c_i(theta) >,

and ``dS/dgrad`` is a scalar per parameter tensor for SGD (``-lr`` times 1, ``1 - dampening`` or ``1 + momentum``:
:func:`sgd_slopes`). So one backward of ``L_meta`` at ``theta^(0)`` gives ``v``, and ``g`` is the forward-mode
derivative (JVP, ``torch.func.jvp``) of ``c`` at ``theta`` in the direction ``dS/dgrad * v``: no double backward,
no graph through the optimizer step (the official code differentiates through a ``higher`` copy of the network
and optimizer). The momentum buffer, the weight decay and the inner loss's gradient move ``theta^(0)`` but do not
depend on ``eps``.

All functions compute in float32 (or the input's wider dtype); call them outside autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ssl.losses.consistency import probabilities
from nnunet_ssl.parts.views import COVERED, View

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- the look-ahead step
def _groups_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def sgd_slopes(originals: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``d theta^ / d grad`` per parameter for one step of ``optimizer`` (a scalar per tensor): torch.optim.SGD's
    ``-lr``, times ``1 - dampening`` with an existing momentum buffer, times ``1 + momentum (...)`` with Nesterov;
    any other optimizer counts as plain SGD with its learning rate (the look-ahead of learning to reweight)."""
    groups = _groups_by_parameter(optimizer)
    sgd = isinstance(optimizer, torch.optim.SGD)
    slopes = {}
    for name, p in originals.items():
        group = groups[id(p)]
        slope = 1.0
        if sgd and group.get("momentum", 0.0):
            mu, damp = float(group["momentum"]), float(group.get("dampening", 0.0))
            has_buffer = optimizer.state.get(p, {}).get("momentum_buffer") is not None
            buffer_slope = (1.0 - damp) if has_buffer else 1.0
            slope = 1.0 + mu * buffer_slope if group.get("nesterov", False) else buffer_slope
        if sgd and group.get("maximize", False):
            slope = -slope
        slopes[name] = -float(group["lr"]) * slope
    return slopes


@torch.no_grad()
def sgd_lookahead(params: Params, grads: dict[str, torch.Tensor | None], originals: dict[str, nn.Parameter],
                  optimizer: torch.optim.Optimizer) -> Params:
    """``theta^`` after one step of ``optimizer`` from ``params`` with gradients ``grads``, without changing the
    optimizer: torch.optim.SGD's update (weight decay, the momentum buffer in ``optimizer.state``, dampening,
    Nesterov, maximize), read from the group of each original parameter; any other optimizer: ``theta - lr g``.
    Parameters without a gradient stay (torch's SGD skips them)."""
    groups = _groups_by_parameter(optimizer)
    sgd = isinstance(optimizer, torch.optim.SGD)
    out = {}
    for name, theta in params.items():
        g = grads.get(name)
        if g is None:
            out[name] = theta.detach()
            continue
        group = groups[id(originals[name])]
        d = -g if sgd and group.get("maximize", False) else g
        if sgd:
            if group.get("weight_decay", 0.0):
                d = d + group["weight_decay"] * theta
            mu = float(group.get("momentum", 0.0))
            if mu:
                buffer = optimizer.state.get(originals[name], {}).get("momentum_buffer")
                buffer = d if buffer is None else mu * buffer.to(d) + (1.0 - float(group.get("dampening", 0.0))) * d
                d = d + mu * buffer if group.get("nesterov", False) else buffer
        out[name] = (theta - float(group["lr"]) * d).detach()
    return out


def voxel_meta_gradient(costs: Callable[[Params], torch.Tensor], meta_loss: Callable[[Params], torch.Tensor],
                        params: Params, inner_loss: torch.Tensor | None,
                        lookahead: Callable[[Params, dict[str, torch.Tensor | None]], Params],
                        slopes: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, L_meta(theta^(0)))``: ``g`` the gradient of the clean loss after one look-ahead step with respect to
    every entry of ``eps`` at 0 (the shape of ``costs(params)``; see the module docstring).

    ``params``: the parameters theta of the look-ahead, leaves with ``requires_grad``; ``inner_loss``: the terms of
    the inner step that do not depend on ``eps`` (MLB-Seg's view and EMA consistency), computed from ``params``
    (None: none); ``lookahead(params, grads)``: theta^(0); ``slopes``: ``d theta^ / d grad`` per parameter;
    ``costs`` and ``meta_loss``: functions of a parameter dict (``torch.func.functional_call`` inside)."""
    names = list(params)
    if inner_loss is not None and inner_loss.requires_grad:
        grads = torch.autograd.grad(inner_loss, [params[k] for k in names], allow_unused=True)
    else:
        grads = [None] * len(names)
    grads = {k: (torch.zeros_like(params[k]) if g is None else g.detach()) for k, g in zip(names, grads)}
    theta_hat = {k: v.detach().requires_grad_(True) for k, v in lookahead(params, grads).items()}
    clean = meta_loss(theta_hat)
    v = torch.autograd.grad(clean, [theta_hat[k] for k in names], allow_unused=True)
    tangents = {k: (torch.zeros_like(params[k]) if vk is None else slopes[k] * vk.detach()) for k, vk in zip(names, v)}
    primals = {k: params[k].detach() for k in names}
    _, g = torch.func.jvp(costs, (primals,), (tangents,))
    return g.detach(), clean.detach()


# ---------------------------------------------------------------------------------------------- the weights
def normalised_weights(g: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """The official 'org' rule: ``w = max(-g, 0) / (sum max(-g, 0) + eps)`` over every entry (all voxels of both
    label maps and all views); all zero where no entry has a negative meta-gradient."""
    w = torch.clamp(-g.float(), min=0.0)
    total = w.sum()
    return w / (total + eps) if float(total) > 0 else w


def uniform_weights(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``1 / numel`` everywhere: the 'org' weights of a constant negative meta-gradient, the weights of the steps
    without a look-ahead (``sum w c`` is then the mean of the two maps' mean CE)."""
    numel = 1
    for n in shape:
        numel *= int(n)
    return torch.full(tuple(shape), 1.0 / numel, device=device)


# ---------------------------------------------------------------------------------------------- costs and labels
def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 if given (the tests' finite differences)."""
    return x if x.dtype == torch.float64 else x.float()


def per_voxel_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per voxel (N, *spatial) of logits (N, C, *spatial) against class indices, in float32 (the
    softmax generalisation of the official per-pixel BCE: equal to it for C = 2)."""
    return F.cross_entropy(_wide(logits), labels.long(), reduction="none")


def label_costs(logits: torch.Tensor, initial: torch.Tensor, enhanced: torch.Tensor) -> torch.Tensor:
    """``[c1; c2]`` (2, N, *spatial): the per-voxel CE against the initial labels and against the PLE labels."""
    return torch.stack([per_voxel_ce(logits, initial), per_voxel_ce(logits, enhanced)])


def mean_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_label: int | None = None) -> torch.Tensor:
    """Mean CE over the voxels that do not carry ``ignore_label`` (0 when there are none): the clean meta loss."""
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None else labels != ignore_label
    ce = F.cross_entropy(_wide(logits), torch.where(valid, labels, torch.zeros_like(labels)), reduction="none")
    return (ce * valid).sum() / valid.sum().clamp(min=1)


def split_views(x: torch.Tensor, views: int) -> list[torch.Tensor]:
    """A view-major batch (V N, ...) -> V tensors (N, ...)."""
    return list(x.chunk(views, 0))


def background(channels: int) -> list[float]:
    """The one-hot vector of class 0: the fill of class probabilities mapped into a zoom-out's padding."""
    return [1.0] + [0.0] * (channels - 1)


@torch.no_grad()
def labels_in_views(probs: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Class probabilities (N, C, *spatial) of the original frame -> argmax labels in every view, view-major
    (V N, *spatial); padding counts as background."""
    fill = background(probs.shape[1])
    return torch.cat([v.forward(probs, fill).max(1).indices for v in views])


@torch.no_grad()
def enhanced_labels(probs: torch.Tensor, views: Sequence[View]) -> tuple[torch.Tensor, torch.Tensor]:
    """PLE: ``(labels (V N, *spatial), mean (N, C, *spatial))``. Every view's probabilities (a view-major batch
    (V N, C, *spatial)) mapped back to the original frame and averaged over the views that show each voxel, then
    the average mapped into every view and its argmax taken (the official threshold at 0.5 for one sigmoid
    channel). A voxel no view shows (only without identity, flip and zoom-out) averages to 0: background."""
    parts = split_views(probs.float(), len(views))
    spatial = tuple(probs.shape[2:])
    total = torch.zeros_like(parts[0])
    count = torch.zeros((1, 1, *spatial), device=probs.device)
    for view, p in zip(views, parts):
        shown = view.coverage(spatial, probs.device).float()
        total = total + shown * view.inverse(p)
        count = count + shown
    mean = total / count.clamp(min=1.0)
    return labels_in_views(mean, views), mean


def view_consistency(logits: torch.Tensor, views: Sequence[View], regions: bool = False) -> torch.Tensor:
    """L_aug: for every ordered pair of views (i, j), i != j, the mean squared difference of view i's probabilities
    (with gradient) and view j's detached probabilities mapped into view i's frame, over the voxels both views show
    and the channels; averaged over the pairs. ``logits``: a view-major batch (V N, C, *spatial)."""
    parts = split_views(probabilities(logits, regions), len(views))
    spatial = tuple(logits.shape[2:])
    channels = logits.shape[1]
    ones = torch.ones(1, 1, *spatial, device=logits.device)
    # each view's detached prediction and its coverage in the original frame, mapped once
    originals = [(v.inverse(p.detach()), v.inverse(ones)) for v, p in zip(views, parts)]
    terms = []
    for i, (vi, pi) in enumerate(zip(views, parts)):
        for j, (original, shown_original) in enumerate(originals):
            if i == j:
                continue
            target = vi.forward(original)
            shown = (vi.forward(shown_original) >= COVERED).float()
            count = shown.sum() * pi.shape[0] * channels
            terms.append((shown * (pi - target) ** 2).sum() / count.clamp(min=1.0))
    if not terms:
        return logits.float().sum() * 0.0
    return torch.stack(terms).mean()
