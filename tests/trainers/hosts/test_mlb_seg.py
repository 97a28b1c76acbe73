"""The MLB-Seg host: the step's views, initial labels, PLE labels and loss against hand computations, the
look-ahead's weights against an explicit double-backward meta-gradient through nnU-Net's SGD step (all parameters
and the decoder only), uniform weights between look-aheads, the warm-up and the switch, the EMA never reset,
resuming, the initial checkpoint, presets and cost, a 2D step, and one short training resumed and predicted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import budget_split, budgeted_trainer, make_trainer, predict_in_process, random_batch, state_copy
from torch.func import functional_call

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import mse_consistency
from nnunet_ssl.losses.meta_reweight import (
    enhanced_labels,
    label_costs,
    labels_in_views,
    mean_ce,
    uniform_weights,
    view_consistency,
)
from nnunet_ssl.parts.views import MLB_VIEWS, View
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.hosts import mlb_seg
from nnunet_ssl.trainers.hosts.mlb_seg import MetaLearnedBootstrapping
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.step import SSLStep

PATCH = (16, 32, 32)
VIEWS = [View("identity"), View("zoom_in", margins=(1, 3, 2)), View("zoom_out", margins=(2, 4, 3)),
         View("zoom_out", margins=(1, 2, 5)), View("flip", axes=(0, 2))]


def _step(trainer, patch=PATCH, seed=0, labeled=2, unlabeled=1) -> SSLStep:
    data, target, views = random_batch(trainer, patch, seed, labeled, unlabeled, views=1)
    return SSLStep(data=data, target=target, views=views, lam=1.0)


def _capture_meta_gradient(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = mlb_seg.normalised_weights

    def capturing(g, eps=1e-10):
        seen.append(g)
        return original(g, eps)

    monkeypatch.setattr(mlb_seg, "normalised_weights", capturing)
    return seen


def _explicit_meta_gradient(trainer, step: SSLStep, teacher_logits: torch.Tensor, scope: str = "all"):
    """g by differentiating through nnU-Net's first SGD step (no momentum buffer yet: Nesterov's
    d = (1 + mu) (grad + wd theta)) with eps as a tensor, create_graph=True: the official higher-style route."""
    net = unwrap(trainer.network)
    named = dict(net.named_parameters())
    names = [k for k in named if scope == "all" or k.startswith("decoder.")]
    theta = {k: named[k].detach().clone().requires_grad_(True) for k in names}
    fixed = {k: v.detach() for k, v in named.items() if k not in theta}
    batch = step.host_data

    def logits_of(t, x):
        return full_resolution(functional_call(net, {**fixed, **t}, (x,), tie_weights=False)).float()

    logits = logits_of(theta, step.student_image)
    enhanced, _ = enhanced_labels(torch.softmax(logits.detach(), 1), batch.views)
    costs = label_costs(logits, batch.initial_labels, enhanced)
    eps = torch.zeros_like(costs, requires_grad=True)
    inner = (eps * costs).sum() + view_consistency(logits, batch.views) + mse_consistency(logits, teacher_logits)
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True, allow_unused=True)
    group = trainer.optimizer.param_groups[0]
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    assert group["nesterov"] and all(not trainer.optimizer.state.get(p) for p in named.values())
    hat = {k: theta[k] - lr * (1 + mu) * ((0 if g is None else g) + wd * theta[k]) for k, g in zip(names, grads)}
    clean = mean_ce(logits_of(hat, step.data), full_resolution(step.target)[:, 0])
    return torch.autograd.grad(clean, eps)[0]


def _assert_close_gradients(g: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 0
    assert torch.allclose(g, expected, rtol=2e-3, atol=2e-3 * scale), float((g - expected).abs().max()) / scale
    # the sign decides which pairs get weight: they agree wherever the value is not negligible
    clear = expected.abs() > 1e-2 * scale
    assert torch.equal(g[clear] < 0, expected[clear] < 0)


def test_step_is_the_hand_computed_loss_with_the_meta_gradient_of_a_double_backward(copy_planned, monkeypatch):
    trainer = budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch)
    assert trainer.warmup_iterations == 1 and trainer.meta_every == 1 and trainer.meta_scope == "all"
    views = VIEWS[:3] + VIEWS[4:]  # identity, zoom-in, zoom-out, flip
    monkeypatch.setattr(trainer, "draw_views", lambda spatial: views)
    seen = _capture_meta_gradient(monkeypatch)
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.ssl_step = 1
    step = _step(trainer)
    originals = dict(unwrap(trainer.network).named_parameters())
    sup, unsup, stats = trainer.forward_losses(step)
    student = unwrap(trainer.network)
    # the look-ahead left the student's own parameters in place (the optimizer's), not its functional copies
    assert all(p is originals[k] for k, p in student.named_parameters())
    assert {id(p) for p in student.parameters()} == {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    # the switch: the initial model and the teacher start from the student, at this step
    assert trainer.bootstrap_start == 1 and stats["stage"] == 1.0 and stats["meta_step"] == 1.0
    for k, v in student.state_dict().items():
        assert torch.equal(trainer.initial_model.state_dict()[k], v) and torch.equal(trainer.teacher.state_dict()[k], v)
    # the views of each unlabeled patch, view-major; the teacher sees them with 0.02 N(0, 1) noise
    u = step.views["view0"]
    assert torch.equal(step.student_image, torch.cat([v.forward(u) for v in views]))
    noise = step.reference_image - step.student_image
    assert 0.015 < float(noise.std()) < 0.025
    batch = step.host_data
    with torch.no_grad():
        initial = torch.softmax(full_resolution(trainer.initial_model(u)), 1)
        teacher = full_resolution(trainer.teacher(step.reference_image)).float()
        out = trainer.network(torch.cat([step.data, step.student_image]))
    assert torch.equal(batch.initial_labels, labels_in_views(initial, views))

    # the weights: the 'org' rule on the meta-gradient, which equals the explicit double backward
    (g,) = seen
    _assert_close_gradients(g, _explicit_meta_gradient(trainer, step, teacher))
    w = batch.weights
    assert w.shape == (2, 4, *PATCH) and float(w.sum()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(w > 0, g < 0)
    assert stats["weighted_fraction"] == pytest.approx(float((g < 0).float().mean()))
    assert stats["weight_initial"] == pytest.approx(float(w[0].sum()), rel=1e-5)

    # the loss: nnU-Net's L_sup on the labeled part; sum w [c1; c2] + L_aug + L_ema on the views
    assert float(sup.detach()) == pytest.approx(float(trainer.loss([o[:2] for o in out], step.target)), rel=1e-5)
    logits = full_resolution(out)[2:].float()
    enhanced, _ = enhanced_labels(torch.softmax(logits, 1), views)
    assert torch.equal(batch.enhanced_labels, enhanced)
    weighted = (w * label_costs(logits, batch.initial_labels, enhanced)).sum()
    aug, ema = view_consistency(logits, views), mse_consistency(logits, teacher)
    assert float(unsup) == pytest.approx(float(weighted + aug + ema), rel=1e-5)
    assert stats["weighted_ce"] == pytest.approx(float(weighted), rel=1e-5)
    assert stats["view_consistency"] == pytest.approx(float(aug), rel=1e-5) and float(aug) > 0
    assert stats["ema_consistency"] == pytest.approx(float(ema), rel=1e-5) and float(ema) > 0
    assert math.isfinite(stats["meta_loss"]) and 0 <= stats["ple_agreement"] <= 1
    assert unsup.dtype == torch.float32 and unsup.requires_grad


def test_warmup_switch_uniform_steps_decoder_scope_and_the_ema(copy_planned, monkeypatch):
    monkeypatch.setenv("nnUNet_ssl_settings", "meta_every=2, meta_scope='decoder'")
    trainer = budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch, epochs=2, iterations=5)
    monkeypatch.setattr(trainer, "draw_views", lambda spatial: VIEWS[:1] + VIEWS[4:])
    seen = _capture_meta_gradient(monkeypatch)
    assert trainer.warmup_iterations == 2
    # stage 0: nnU-Net's supervised step, lambda 0
    step = _step(trainer, seed=1)
    assert trainer.in_warmup() and trainer.ramp() == 0.0
    sup, unsup, stats = trainer.forward_losses(step)
    with torch.no_grad():
        expected = trainer.loss(trainer.network(step.data), step.target)
    assert float(sup) == pytest.approx(float(expected), rel=1e-6) and float(unsup) == 0.0 and stats == {"stage": 0.0}
    assert trainer.bootstrap_start is None
    # the switch at T_0 = 2: the ramp starts there; a look-ahead over the decoder's parameters only
    trainer.ssl_step = 2
    assert not trainer.in_warmup() and trainer.ramp() == pytest.approx(math.exp(-5))
    scope = trainer.lookahead_parameters()
    assert scope and all(k.startswith("decoder.") for k in scope)
    assert not any(k.startswith("decoder.encoder") for k in scope)
    step = _step(trainer, seed=2)
    trainer.forward_losses(step)
    assert trainer.bootstrap_start == 2 and step.host_data.meta_step
    with torch.no_grad():
        teacher = full_resolution(trainer.teacher(step.reference_image)).float()
    _assert_close_gradients(seen[-1], _explicit_meta_gradient(trainer, step, teacher, scope="decoder"))
    # the EMA's t counts from the switch: the first update copies the student, then alpha = 1/2
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(0.1)
    trainer.after_optimizer_step()
    for k, v in unwrap(trainer.network).state_dict().items():
        assert torch.equal(trainer.teacher.state_dict()[k], v), k
    before = state_copy(trainer.teacher)
    trainer.ssl_step = 3
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(0.1)
    trainer.after_optimizer_step()
    for k, v in unwrap(trainer.network).named_parameters():
        assert torch.allclose(trainer.teacher.state_dict()[k], (before[k] + v.detach()) / 2, atol=1e-6), k
    # k = 2: the step after a look-ahead has uniform weights
    step = _step(trainer, seed=3)
    _, _, stats = trainer.forward_losses(step)
    assert not step.host_data.meta_step and stats["meta_step"] == 0.0 and len(seen) == 1
    assert torch.equal(step.host_data.weights, uniform_weights((2, 2, *PATCH)))
    assert "weighted_fraction" not in stats
    trainer.ssl_step = 4
    trainer.forward_losses(_step(trainer, seed=4))
    assert len(seen) == 2


def test_resume_initial_checkpoint_settings_presets_and_cost(copy_planned, monkeypatch, tmp_path):
    trainer = budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch)
    trainer.ssl_step = 1
    trainer.start_bootstrapping()
    with torch.no_grad():
        for p in unwrap(trainer.network).parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.ssl_step = 2
    trainer.after_optimizer_step()
    ckpt = tmp_path / "mlb.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch, continue_training=True)
    resumed.load_checkpoint(str(ckpt))
    assert resumed.ssl_step == 2 and resumed.bootstrap_start == 1
    for mine, theirs in [(trainer.teacher, resumed.teacher), (trainer.initial_model, resumed.initial_model)]:
        for k, v in state_copy(mine).items():
            assert torch.equal(theirs.state_dict()[k], v), k
    assert not torch.equal(next(resumed.initial_model.parameters()), next(resumed.teacher.parameters()))

    # a supervised run's checkpoint, heads included, becomes the student, the initial model and the teacher
    monkeypatch.setenv("nnUNet_ssl_settings", f"initial_checkpoint='{ckpt}'")
    started = budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch)
    assert started.warmup_iterations == 0 and not started.in_warmup()
    started.sync_reference_from_student()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    for net in (unwrap(started.network), started.initial_model, started.teacher):
        for k, v in net.state_dict().items():
            assert torch.equal(v, saved[k]), k
    assert any(".seg_layers." in k for k in saved)
    bad = tmp_path / "bad.pth"
    torch.save({"network_weights": {"x": torch.zeros(1)}}, bad)
    monkeypatch.setenv("nnUNet_ssl_settings", f"initial_checkpoint='{bad}'")
    with pytest.raises(SSLInputError, match="does not hold this network"):
        budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch).sync_reference_from_student()
    for text, name in [("meta_every=0", "meta_every"), ("meta_scope='encoder'", "meta_scope"),
                       ("view_kinds=('identity',)", "view_kinds"), ("zoom_range=(0.1, 0.5)", "zoom_range"),
                       ("warmup_fraction=0.0", "warmup_fraction"), ("initial_checkpoint='/nowhere.pth'", "nowhere")]:
        monkeypatch.setenv("nnUNet_ssl_settings", text)
        with pytest.raises(SSLInputError, match=name):
            make_trainer(MetaLearnedBootstrapping, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    monkeypatch.delenv("nnUNet_ssl_settings")

    class WithPlugin(MetaSSL, MetaLearnedBootstrapping):
        pass

    with pytest.raises(SSLInputError, match="no plug-in"):
        make_trainer(WithPlugin, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(MetaLearnedBootstrapping, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    for name, value in paper_settings_of(MetaLearnedBootstrapping).items():
        assert getattr(paper, name) == value, name
    assert paper.unlabeled_batch_size == 1 and paper.rampup_fraction == 0.0 and paper.unsupervised_weight == 1.0
    assert paper.view_kinds == MLB_VIEWS and paper.teacher_noise_std == 0.02
    # B = 2, U = 2, n = 10: warm-up 6; real step 36 + teacher 10 + initial 2; look-ahead 6 n + 3 B = 66
    assert MetaLearnedBootstrapping.compute_units(2, 2) == pytest.approx(0.2 * 6 + 0.8 * (48 + 66))
    monkeypatch.setattr(MetaLearnedBootstrapping, "meta_every", 2)
    assert MetaLearnedBootstrapping.compute_units(2, 2) == pytest.approx(0.2 * 6 + 0.8 * (48 + 33))
    monkeypatch.setattr(MetaLearnedBootstrapping, "meta_scope", "decoder")
    assert MetaLearnedBootstrapping.compute_units(2, 2) == pytest.approx(0.2 * 6 + 0.8 * (48 + (40 + 4) / 2))


def test_a_2d_step_with_the_decoder_scope(copy_planned, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    budget_split(copy_planned)
    monkeypatch.setenv("nnUNet_ssl_settings", "meta_scope='decoder'")
    planar = budgeted_trainer(MetaLearnedBootstrapping, copy_planned, monkeypatch, configuration="2d")
    planar.ssl_step = planar.warmup_iterations
    step = _step(planar, patch=(32, 32), seed=6, labeled=3, unlabeled=2)
    sup, unsup, stats = planar.forward_losses(step)
    batch = step.host_data
    assert [v.kind for v in batch.views] == list(MLB_VIEWS) and all(len(v.margins) == 2 for v in batch.views[1:4])
    assert step.student_image.shape == (10, 1, 32, 32) and batch.weights.shape == (2, 10, 32, 32)
    assert math.isfinite(float(sup.detach())) and math.isfinite(float(unsup.detach())) and stats["weighted_ce"] > 0
    unsup.backward()
    assert all(p.grad is not None for p in unwrap(planar.network).decoder.seg_layers[-1].parameters())


def test_short_training_resumes_and_predicts(copy_planned, monkeypatch):
    from nnunet_ssl.trainers.catalogue import nnUNetTrainerMLBSeg

    # three views of one unlabeled patch per step: the mechanism whole, at a third of the default's cost on CPU
    monkeypatch.setenv("nnUNet_ssl_settings", "unlabeled_batch_size=1, view_kinds=('identity', 'zoom_out', 'flip')")
    trainer = budgeted_trainer(nnUNetTrainerMLBSeg, copy_planned, monkeypatch, epochs=1, iterations=2)
    trainer.run_training()
    out = Path(trainer.output_folder)
    assert trainer.bootstrap_start == 1 and trainer.ssl_step == 2
    resumed = budgeted_trainer(nnUNetTrainerMLBSeg, copy_planned, monkeypatch, epochs=2, iterations=2,
                               continue_training=True)
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    assert resumed.bootstrap_start == 1
    for k, v in trainer.initial_model.state_dict().items():
        assert torch.equal(resumed.initial_model.state_dict()[k], v), k
    resumed.run_training()
    assert resumed.ssl_step == 4 and resumed.current_epoch == 2 and resumed.bootstrap_start == 1
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["ssl_stage"] == [0.5, 1.0] and log["ssl_meta_step"] == [1.0, 1.0]
    for key in ("ssl_weighted_ce", "ssl_view_consistency", "ssl_ema_consistency", "ssl_weighted_fraction",
                "ssl_meta_loss", "ssl_unsup_share"):
        assert len(log[key]) == 2 and all(math.isfinite(v) and v > 0 for v in log[key]), (key, log[key])
    assert (out / "progress_ssl.png").is_file()
    saved = torch.load(out / "checkpoint_final_teacher.pth", map_location="cpu", weights_only=False)
    for k, v in resumed.teacher.state_dict().items():
        assert torch.equal(saved["network_weights"][k], v.cpu()), k
    # nnUNetv2_predict -chk checkpoint_final_teacher.pth, in-process (the CLI's start-up alone takes 25 s)
    predict_in_process(copy_planned, out, "checkpoint_final_teacher.pth", monkeypatch)
