"""Exponential moving average (EMA) teacher, as in Mean Teacher.

Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017, Eq. (1):
``theta'_t = alpha theta'_{t-1} + (1 - alpha) theta_t``, with the warm-up of the official code and SSL4MIS,
``alpha_t = min(1 - 1/(t + 1), alpha)``, where ``t`` counts the updates made before this one. The first update
(t = 0) therefore copies the student and early on the teacher is the true running average of the students.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, max_decay: float = 0.99) -> float:
    """``min(1 - 1/(step + 1), max_decay)`` for the ``step``-th update (0-based)."""
    return min(1.0 - 1.0 / (step + 1), max_decay)


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached deep copy of ``student`` whose parameters never receive gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` for parameters; buffers (e.g. BatchNorm running
    statistics) are copied from the student, since averaging counters such as ``num_batches_tracked`` is
    meaningless. Both modules must have the same architecture."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different numbers of parameters")
    if t_params:
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
