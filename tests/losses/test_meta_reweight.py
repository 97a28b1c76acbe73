"""MLB-Seg's losses: the meta-gradient of a tiny per-voxel linear model against its closed form (plain SGD) and
against finite differences through torch's own SGD step (momentum buffer, Nesterov, dampening, weight decay, an
inner loss), the look-ahead step against torch.optim.SGD, the 'org' weight normalisation, PLE and the view
consistency by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nnunet_ssl.losses.meta_reweight import (
    enhanced_labels,
    label_costs,
    labels_in_views,
    mean_ce,
    normalised_weights,
    per_voxel_ce,
    sgd_lookahead,
    sgd_slopes,
    uniform_weights,
    view_consistency,
    voxel_meta_gradient,
)
from nnunet_ssl.parts.views import View

C, CIN = 3, 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(CIN, C, 1).double()  # a linear model per voxel


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CIN, 3, 4, generator=g, dtype=torch.float64)  # the training images
    y1, y2 = (torch.randint(0, C, (2, 3, 4), generator=g) for _ in range(2))  # initial and PLE labels
    xm = torch.randn(2, CIN, 3, 4, generator=g, dtype=torch.float64)  # the meta (labeled) images
    ym = torch.randint(0, C, (2, 3, 4), generator=g)
    return x, y1, y2, xm, ym


def _inner(model, theta, x):
    """A stand-in for L_aug + L_ema: any differentiable loss that does not depend on eps."""
    p = torch.softmax(functional_call(model, theta, (x,)), 1)
    return ((p - 0.2) ** 2).mean() * 3.0


def _meta_gradient(model, optimizer, x, y1, y2, xm, ym, with_inner: bool):
    originals = dict(model.named_parameters())
    params = {k: p.detach().clone().requires_grad_(True) for k, p in originals.items()}
    inner = _inner(model, params, x) if with_inner else None
    return voxel_meta_gradient(
        costs=lambda t: label_costs(functional_call(model, t, (x,)), y1, y2),
        meta_loss=lambda t: mean_ce(functional_call(model, t, (xm,)), ym),
        params=params, inner_loss=inner,
        lookahead=lambda t, g: sgd_lookahead(t, g, originals, optimizer),
        slopes=sgd_slopes(originals, optimizer))


def test_meta_gradient_of_a_linear_model_has_the_closed_form():
    model = _model()
    x, y1, y2, xm, ym = _data()
    lr = 0.3
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    g, clean = _meta_gradient(model, optimizer, x, y1, y2, xm, ym, with_inner=False)
    assert g.shape == (2, 2, 3, 4)
    # plain SGD and no inner loss: theta^(0) = theta, and g_i = -lr <grad c_i, grad L_meta(theta)>; for a linear
    # model z = W x + b per voxel, grad_W CE = (softmax(z) - onehot(y)) x^T, grad_b = softmax(z) - onehot(y)
    W, b = model.weight[:, :, 0, 0].detach(), model.bias.detach()

    def residual(xs, ys):
        z = torch.einsum("ck,nkhw->nchw", W, xs) + b[None, :, None, None]
        return torch.softmax(z, 1) - F.one_hot(ys, C).permute(0, 3, 1, 2).double()

    rm = residual(xm, ym)
    n_meta = ym.numel()
    v_w = torch.einsum("nchw,nkhw->ck", rm, xm) / n_meta
    v_b = rm.sum((0, 2, 3)) / n_meta
    for m, ys in enumerate((y1, y2)):
        r = residual(x, ys)
        expected = -lr * (torch.einsum("nchw,nkhw,ck->nhw", r, x, v_w) + torch.einsum("nchw,c->nhw", r, v_b))
        assert torch.allclose(g[m], expected, rtol=1e-10, atol=1e-12), m
    assert float(clean) == pytest.approx(float(F.cross_entropy(torch.einsum("ck,nkhw->nchw", W, xm)
                                                                + b[None, :, None, None], ym)), rel=1e-12)


@pytest.mark.parametrize("settings", [dict(momentum=0.99, nesterov=True, weight_decay=3e-2),
                                      dict(momentum=0.9, dampening=0.3, weight_decay=1e-2)])
def test_meta_gradient_matches_finite_differences_through_torch_sgd(settings):
    model = _model()
    x, y1, y2, xm, ym = _data(2)
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, **settings)
    # one real step first, so the momentum buffer exists (and dampening applies)
    (functional_call(model, dict(model.named_parameters()), (x,)) ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    g, _ = _meta_gradient(model, optimizer, x, y1, y2, xm, ym, with_inner=True)

    def clean_after_step(eps: torch.Tensor) -> float:
        """L_meta after torch's own SGD step on sum eps c + inner (on copies of the model and optimizer)."""
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr, **settings)
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        theta = dict(m.named_parameters())
        loss = (eps * label_costs(functional_call(m, theta, (x,)), y1, y2)).sum() + _inner(m, theta, x)
        loss.backward()
        opt.step()
        with torch.no_grad():
            return float(mean_ce(m(xm), ym))

    h = 1e-4
    for index in [(0, 0, 0, 0), (0, 1, 2, 3), (1, 0, 1, 2), (1, 1, 2, 0)]:
        e = torch.zeros_like(g)
        e[index] = h
        fd = (clean_after_step(e) - clean_after_step(-e)) / (2 * h)
        assert g[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-10), index
    # the look-ahead read the momentum buffers and left them as they were
    assert all(optimizer.state[p]["momentum_buffer"] is not None for p in model.parameters())
    before = copy.deepcopy(optimizer.state_dict())
    _meta_gradient(model, optimizer, x, y1, y2, xm, ym, with_inner=True)
    for k, s in optimizer.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], before["state"][k]["momentum_buffer"])


def test_lookahead_is_torch_sgd_and_the_slopes():
    model = _model()
    x = _data()[0]
    settings = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    optimizer = torch.optim.SGD(model.parameters(), **settings)
    originals = dict(model.named_parameters())
    # no buffer yet: Nesterov's slope is -lr (1 + mu); then -lr (1 + mu (1 - dampening)) = the same without dampening
    assert sgd_slopes(originals, optimizer) == {k: pytest.approx(-0.1 * 1.9) for k in originals}
    for _ in range(2):
        params = {k: p.detach().clone() for k, p in originals.items()}
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        hat = sgd_lookahead(params, grads, originals, optimizer)
        for k, p in originals.items():
            p.grad = grads[k].clone()
        optimizer.step()
        for k, p in originals.items():
            assert torch.allclose(hat[k], p.detach(), rtol=1e-12, atol=1e-14), k
    plain = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)  # no Nesterov, fresh buffer: slope -lr
    assert sgd_slopes(originals, plain) == {k: pytest.approx(-0.2) for k in originals}
    adam = torch.optim.Adam(model.parameters(), lr=0.01)  # other optimizers: plain SGD with their rate
    assert sgd_slopes(originals, adam) == {k: pytest.approx(-0.01) for k in originals}
    params = {k: p.detach().clone() for k, p in originals.items()}
    hat = sgd_lookahead(params, {"weight": torch.ones_like(params["weight"]), "bias": None}, originals, adam)
    assert torch.allclose(hat["weight"], params["weight"] - 0.01) and torch.equal(hat["bias"], params["bias"])
    assert x.shape[1] == CIN


def test_weight_normalisation_and_uniform_weights():
    g = torch.tensor([[[-1.0, 2.0], [-3.0, 0.0]], [[0.5, -4.0], [0.0, 0.0]]])
    w = normalised_weights(g)
    # max(-g, 0) = [1, 0, 3, 0, 0, 4, 0, 0] / 8
    assert torch.allclose(w, torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 4.0], [0.0, 0.0]]]) / 8)
    assert float(w.sum()) == pytest.approx(1.0)
    assert torch.equal(normalised_weights(torch.tensor([0.0, 1.0, 2.0])), torch.zeros(3))  # nothing helps: all 0
    u = uniform_weights((2, 3, 4, 5))
    assert u.shape == (2, 3, 4, 5) and float(u.sum()) == pytest.approx(1.0)
    c = torch.rand(2, 3, 4, 5)
    assert float((u * c).sum()) == pytest.approx(float((c[0].mean() + c[1].mean()) / 2), rel=1e-6)


def test_costs_and_clean_loss():
    logits = torch.randn(2, 3, 4, 5)
    y1, y2 = torch.randint(0, 3, (2, 4, 5)), torch.randint(0, 3, (2, 4, 5))
    c = label_costs(logits, y1, y2)
    manual = -torch.log_softmax(logits, 1).gather(1, y1[:, None])[:, 0]
    assert torch.allclose(c[0], manual) and torch.allclose(c[1], per_voxel_ce(logits, y2))
    # two classes: CE of softmax = BCE of the sigmoid of the logit difference (the official one-channel loss)
    two = torch.randn(1, 2, 3, 3)
    yb = torch.randint(0, 2, (1, 3, 3))
    bce = F.binary_cross_entropy_with_logits(two[:, 1] - two[:, 0], yb.double().float(), reduction="none")
    assert torch.allclose(per_voxel_ce(two, yb), bce, atol=1e-6)
    ignored = y1.clone()
    ignored[0] = 7
    assert float(mean_ce(logits, ignored, 7)) == pytest.approx(float(per_voxel_ce(logits[1:], y1[1:]).mean()))


def test_ple_and_initial_labels_by_hand():
    spatial = (8, 8)
    identity, flip = View("identity"), View("flip", axes=(1,))
    zin = View("zoom_in", margins=(2, 2))
    p = torch.softmax(torch.randn(1, 3, *spatial), 1)
    q = torch.softmax(torch.randn(1, 3, *spatial), 1)
    r = torch.softmax(torch.randn(1, 3, *spatial), 1)
    # identity and flip: the mean of p and q flipped back, mapped into each view
    labels, mean = enhanced_labels(torch.cat([p, q]), [identity, flip])
    expected = (p + q.flip(3)) / 2
    assert torch.allclose(mean, expected)
    assert torch.equal(labels, torch.cat([expected.argmax(1), expected.flip(3).argmax(1)]))
    # with a zoom-in: its border is not shown, so the border averages the other two views only
    _, mean3 = enhanced_labels(torch.cat([p, q, r]), [identity, flip, zin])
    assert torch.allclose(mean3[..., 0, 0], expected[..., 0, 0])
    centre = (p + q.flip(3) + zin.inverse(r)) / 3
    assert torch.allclose(mean3[..., 4, 4], centre[..., 4, 4])
    # initial labels in a zoom-out: the padding is background, the centre the squeezed argmax
    zout = View("zoom_out", margins=(2, 2))
    init = torch.zeros(1, 3, *spatial)
    init[:, 2] = 1.0
    lab = labels_in_views(init, [identity, zout])
    assert torch.equal(lab[0], torch.full(spatial, 2)) and int(lab[1, 0, 0]) == 0 and int(lab[1, 4, 4]) == 2


def test_view_consistency_by_hand():
    identity, flip = View("identity"), View("flip", axes=(0,))
    logits = torch.randn(4, 3, 6, 6, requires_grad=True)  # 2 views x 2 images, view-major
    loss = view_consistency(logits, [identity, flip])
    p = torch.softmax(logits, 1)
    a, b = p[:2], p[2:]
    # both ordered pairs: identity against the flipped-back flip view, the flip view against the flipped identity
    expected = (((a - b.flip(2)) ** 2).mean() + ((b - a.flip(2)) ** 2).mean()) / 2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # the targets are detached: each view gets the gradient of its own terms only (twice the same MSE here)
    (grad,) = torch.autograd.grad(loss, logits)
    (by_hand,) = torch.autograd.grad(((a - b.flip(2).detach()) ** 2).mean() / 2
                                     + ((b - a.flip(2).detach()) ** 2).mean() / 2, logits)
    assert torch.allclose(grad, by_hand, atol=1e-7)
    # a zoom-out's padding is not compared: changing the prediction there changes nothing
    zout = View("zoom_out", margins=(2, 2))
    base = torch.randn(2, 3, 8, 8)
    moved = base.clone()
    moved[1, 0, 0, :] += 5.0  # the zoom-out view's padded first row
    views = [identity, zout]
    assert float(view_consistency(base, views)) == pytest.approx(float(view_consistency(moved, views)), rel=1e-6)
    moved[1, 0, 4, 4] += 5.0  # a voxel it shows
    assert float(view_consistency(moved, views)) != pytest.approx(float(view_consistency(base, views)), rel=1e-3)
