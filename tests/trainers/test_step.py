"""SSLStep: the total loss and its order of terms."""

from __future__ import annotations

import pytest
import torch

from nnunet_ssl.trainers.step import SSLStep


def test_total_is_sup_plus_constant_plus_lambda_unsup_plus_scheduled():
    step = SSLStep(data=torch.zeros(2, 1, 4), target=torch.zeros(2, 1, 4), views={"view0": torch.zeros(3, 1, 4)},
                   lam=0.25)
    assert step.direction == 0 and step.mix is None
    sup = torch.tensor(1.0, dtype=torch.float16)
    unsup = torch.tensor(2.0, requires_grad=True)
    constant = torch.tensor(3.0, requires_grad=True)
    scheduled = torch.tensor(5.0, requires_grad=True)
    step.add_constant_loss(constant)
    step.add_scheduled_loss(scheduled)
    total = step.total(sup, unsup)
    assert total.dtype == torch.float32 and total.item() == pytest.approx(1 + 3 + 0.25 * 2 + 5)
    total.backward()
    assert unsup.grad.item() == pytest.approx(0.25) and constant.grad.item() == 1 and scheduled.grad.item() == 1
    # without extra terms it is nnU-Net's L_sup + lambda L_unsup
    plain = SSLStep(data=torch.zeros(1), target=torch.zeros(1), views={}, lam=0.5)
    assert plain.total(torch.tensor(1.0), torch.tensor(4.0)).item() == pytest.approx(3.0)
