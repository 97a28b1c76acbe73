"""Quality-guided trainers (QAR, PL-QW, both, with MetaSSL) on the Mean Teacher host: in-process on the synthetic
dataset with an untrained saved predictor, and from the command line after nnUNetv2_ssl_train_quality."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import budget_split, make_trainer, save_untrained_quality_predictor, state_copy

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses import quality as qg
from nnunet_ssl.losses.metassl import MetaSSLLoss
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers import (
    nnUNetTrainerMeanTeacherMetaSSL,
    nnUNetTrainerMeanTeacherQAR,
    nnUNetTrainerMeanTeacherQualityGuided,
    nnUNetTrainerMeanTeacherQualityGuidedMetaSSL,
    nnUNetTrainerMeanTeacherQW,
)
from nnunet_ssl.trainers.base import ENV_PRESET, paper_settings_of
from nnunet_ssl.trainers.plugins.quality import ENV_QUALITY_CHECKPOINT, QualityGuidance
from nnunet_ssl.trainers.step import SSLStep
from nnunet_ssl.utils.files import file_sha256


@pytest.fixture(autouse=True)
def _no_preset_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_PRESET, raising=False)


class _AllActive(nnUNetTrainerMeanTeacherQualityGuided):
    """Both mechanisms at the paper's full weight from the first step, every pseudo-label kept."""

    preset = "paper"
    qar_delay_fraction = qar_rampup_fraction = 0.0
    qw_delay_fraction = qw_rampup_fraction = 0.0
    qw_threshold = 0.0


def _save_untrained_predictor(trainer, seed: int = 0) -> Path:
    return save_untrained_quality_predictor(Path(trainer.preprocessed_dataset_folder_base), seed=seed,
                                            configuration=trainer.configuration_name, fold=trainer.fold)[0]


def test_refuses_to_start_without_a_predictor(copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(nnUNetTrainerMeanTeacherQW, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    with pytest.raises(SSLInputError) as info:
        trainer.initialize()
    message = str(info.value)
    assert "\n" not in message and "no quality predictor for Dataset990_SSLSynthetic (3d_fullres, fold 0)" in message
    assert message.endswith("train it first with nnUNetv2_ssl_train_quality -d Dataset990_SSLSynthetic "
                            "-c 3d_fullres -f 0")
    assert info.value.code == f"nnunet-ssl: error: {message}"  # what the interpreter prints on exit

    monkeypatch.setenv(ENV_QUALITY_CHECKPOINT, str(tmp_path / "missing.pth"))
    trainer = make_trainer(nnUNetTrainerMeanTeacherQAR, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    with pytest.raises(SSLInputError, match=f"{ENV_QUALITY_CHECKPOINT}=.*missing.pth is not a file.*"
                                            "nnUNetv2_ssl_train_quality -d Dataset990_SSLSynthetic"):
        trainer.initialize()


def test_steps_gradient_through_frozen_predictor_and_checkpoint_roundtrip(copy_planned, monkeypatch, tmp_path,
                                                                            capsys):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(_AllActive, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=2,
                           iterations=2)
    path = _save_untrained_predictor(trainer)
    trainer.on_train_start()
    try:
        predictor = trainer.quality_predictor
        before = state_copy(predictor)
        student = unwrap(trainer.network)
        # the predictor is neither part of the saved/predicted network nor optimised
        assert not any(m is predictor for m in trainer.network.modules())
        optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in optimised for p in predictor.parameters())
        assert next(predictor.parameters()).device == trainer.device

        # QAR reaches the student's weights through the frozen predictor
        captured = []
        original = SSLStep.add_scheduled_loss

        def capture(step, term):
            probe = student.encoder.stages[0][0].convs[0].conv.weight
            (grad,) = torch.autograd.grad(term, probe, retain_graph=True)
            captured.append((float(term.detach()), float(grad.abs().sum())))
            original(step, term)

        monkeypatch.setattr(SSLStep, "add_scheduled_loss", capture)
        trainer.on_train_epoch_start()
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
        assert len(captured) == 2
        for term, grad_norm in captured:
            assert 0.0 <= term <= 0.01 and grad_norm > 0  # 0.01 * (1 - q)

        stats = trainer._epoch_stats[-1]
        assert stats["ssl_qar_weight"] == pytest.approx(0.01) and stats["ssl_lambda"] == pytest.approx(0.25)
        assert stats["ssl_quality_kept"] == 1.0
        assert 0.0 <= stats["ssl_quality_student"] <= 1.0 and 0.0 <= stats["ssl_quality_reference"] <= 1.0
        assert captured[-1][0] == pytest.approx(0.01 * (1 - trainer._epoch_stats[-1]["ssl_quality_student"]),
                                                abs=1e-6)
        # frozen: unchanged, eval mode, no parameter gradients
        assert not predictor.training and all(p.grad is None for p in predictor.parameters())
        for k, v in predictor.state_dict().items():
            assert torch.equal(v, before[k]), k

        ckpt = tmp_path / "ckpt.pth"
        trainer.save_checkpoint(str(ckpt))
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert set(saved["network_weights"]) == set(student.state_dict())
        assert saved["ssl_state"]["quality_predictor"] == {"path": str(path.resolve()), "sha256": file_sha256(path)}
        assert saved["ssl_state"]["ssl_step"] == 2
        assert saved["ssl_state"]["qar_balance"] == trainer.qar_balance.state_dict()
        assert saved["ssl_state"]["quality_threshold"] == trainer.quality_threshold.state_dict()
        # the paper preset feeds neither QAR's balance nor the threshold's EMA
        assert trainer.qar_balance.steps == 0 and trainer.quality_threshold.steps == 0

        # --c: counters and teacher come back; a replaced predictor file is reported
        _save_untrained_predictor(trainer, seed=1)
        capsys.readouterr()
        resumed = make_trainer(_AllActive, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=2,
                               iterations=2, continue_training=True)
        resumed.load_checkpoint(str(ckpt))
        assert resumed.ssl_step == 2 and resumed.preset == "paper"
        resumed.qar_balance.load_state_dict({"sup": 0.5, "unsup": 0.25, "steps": 7})
        resumed.quality_threshold.load_state_dict({"ema": 0.3, "steps": 3})
        resumed.load_ssl_state_dict({**saved["ssl_state"], "qar_balance": {"sup": 0.1, "unsup": 0.2, "steps": 11},
                                     "quality_threshold": {"ema": 0.4, "steps": 5}})
        assert resumed.qar_balance.state_dict() == {"sup": 0.1, "unsup": 0.2, "steps": 11}
        assert resumed.quality_threshold.state_dict() == {"ema": 0.4, "steps": 5}
        for k, v in trainer.teacher.state_dict().items():
            assert torch.equal(resumed.teacher.state_dict()[k], v), k
        assert "warning: this training started with the quality predictor" in capsys.readouterr().out
    finally:
        trainer.on_train_end()
    assert (trainer.output_folder and (copy_planned["root"] / "results").exists())


def test_paper_preset_restores_the_official_configuration(copy_planned, monkeypatch):
    budget_split(copy_planned)
    roots = (copy_planned["root"], copy_planned["dataset"])
    official = {"qar_share": None, "qar_official_ramp": True, "qar_weight": 0.01, "qar_delay_fraction": 0.15,
                "qar_rampup_fraction": 0.2, "qw_official_lambda": True, "qw_weight": 0.25, "qw_delay_fraction": 0.075,
                "qw_rampup_fraction": 0.15, "qw_threshold": 0.5, "qw_adaptive_threshold": False,
                "qw_temperature": 2.0, "qw_per": "sample", "unsupervised_share": None}
    ours = {**official, "qar_share": 0.05, "max_qar_weight": 1.0, "qar_official_ramp": False,
            "qw_official_lambda": False, "qw_adaptive_threshold": True, "unsupervised_share": None}
    settings = {"qar_share": None, "qar_official_ramp": True, "qw_official_lambda": True,
                "qw_adaptive_threshold": False}
    assert QualityGuidance.paper_settings == settings
    for cls in (nnUNetTrainerMeanTeacherQAR, nnUNetTrainerMeanTeacherQW, nnUNetTrainerMeanTeacherQualityGuided,
                nnUNetTrainerMeanTeacherQualityGuidedMetaSSL):
        assert settings.items() <= paper_settings_of(cls).items()
        default = make_trainer(cls, *roots, monkeypatch)
        assert default.preset == "default"
        assert {k: getattr(default, k) for k in ours} == ours, cls.__name__
        monkeypatch.setenv(ENV_PRESET, "paper")
        paper = make_trainer(cls, *roots, monkeypatch)
        monkeypatch.delenv(ENV_PRESET)
        assert paper.preset == "paper"
        assert {k: getattr(paper, k) for k in official} == official, cls.__name__
        assert {k: getattr(cls, k) for k in ours if k != "unsupervised_share"} == \
            {k: v for k, v in ours.items() if k != "unsupervised_share"}  # the class keeps our defaults
    # the class attribute selects the paper preset as the environment variable does
    by_attribute = make_trainer(_AllActive, *roots, monkeypatch)
    assert by_attribute.qar_share is None and by_attribute.qw_official_lambda and by_attribute.qar_delay_fraction == 0


def _feed(trainer, sup: float, unsup: float, qar: float, steps: int = 10) -> None:
    """``steps`` training steps' loss sizes, as ``train_step`` passes them (QAR's from ``unsupervised_loss``)."""
    for _ in range(steps):
        step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={}, lam=0.0)
        if isinstance(trainer, QualityGuidance):
            step.observe("qar", torch.tensor(qar))
        trainer.observe_losses(step, torch.tensor(sup), torch.tensor(unsup))


def test_paper_schedules_of_each_trainer(copy_planned, monkeypatch):
    budget_split(copy_planned)
    roots = (copy_planned["root"], copy_planned["dataset"])
    monkeypatch.setenv(ENV_PRESET, "paper")
    qar = make_trainer(nnUNetTrainerMeanTeacherQAR, *roots, monkeypatch, epochs=10, iterations=10)
    qw = make_trainer(nnUNetTrainerMeanTeacherQW, *roots, monkeypatch, epochs=10, iterations=10)
    meta = make_trainer(nnUNetTrainerMeanTeacherQualityGuidedMetaSSL, *roots, monkeypatch, epochs=10, iterations=10)
    plain_meta = make_trainer(nnUNetTrainerMeanTeacherMetaSSL, *roots, monkeypatch, epochs=10, iterations=10)
    for t in (qar, qw, meta, plain_meta):  # loss sizes change nothing in the paper preset
        _feed(t, -0.2, 0.3, 0.4)
    for step, qar_w, qw_lam in ((0, 0.0, 0.0), (7, 0.0, 0.0), (15, 0.0, 0.25 * 0.5), (25, 0.01 * 0.5, 0.25),
                                (40, 0.01, 0.25)):
        for t in (qar, qw, meta, plain_meta):
            t.ssl_step = step
        # QAR keeps the Mean Teacher's lambda (0.1, sigmoid over 20 %) and adds its own linear ramp; PL-QW brings its
        # own lambda
        assert qar.current_qar_weight() == pytest.approx(qar_w)
        assert qar.current_lambda() == pytest.approx(0.1 * sigmoid_rampup(step, 20))
        assert qw.current_qar_weight() == 0.0 and qw.current_lambda() == pytest.approx(qw_lam)
        # MetaSSL keeps its own lambda; QAR its own ramp
        assert meta.current_qar_weight() == pytest.approx(qar_w)
        assert meta.current_lambda() == pytest.approx(plain_meta.current_lambda())
    assert qar.qar_balance.steps == 0


def test_default_schedules_follow_the_common_ramp_and_the_loss_sizes(copy_planned, monkeypatch):
    budget_split(copy_planned)
    roots = (copy_planned["root"], copy_planned["dataset"])
    # the host's balanced lambda (a setting, off by default), so that PL-QW's following it is visible
    monkeypatch.setenv("nnUNet_ssl_settings", "unsupervised_share=0.2")
    qar = make_trainer(nnUNetTrainerMeanTeacherQAR, *roots, monkeypatch, epochs=10, iterations=10)
    qw = make_trainer(nnUNetTrainerMeanTeacherQW, *roots, monkeypatch, epochs=10, iterations=10)
    meta = make_trainer(nnUNetTrainerMeanTeacherQualityGuidedMetaSSL, *roots, monkeypatch, epochs=10, iterations=10)
    plain_meta = make_trainer(nnUNetTrainerMeanTeacherMetaSSL, *roots, monkeypatch, epochs=10, iterations=10)
    # before 10 observed steps: lambda_QAR = qar_weight (0.01), the host's lambda its initial weight (Mean Teacher: 1)
    for step in (0, 10, 40):
        qar.ssl_step = qw.ssl_step = step
        assert qar.current_qar_weight() == pytest.approx(0.01 * sigmoid_rampup(step, 20))
        assert qw.current_lambda() == pytest.approx(1.0 * sigmoid_rampup(step, 20))
    # L_sup = -0.2 with one network: L_sup + n = 0.8; L_QAR = 0.4, L_unsup = 0.3
    for t in (qar, qw, meta, plain_meta):
        _feed(t, -0.2, 0.3, 0.4)
    # lambda_QAR = ramp * 0.05 * 0.8 / 0.4 = 0.1 ramp: lambda_QAR L_QAR = 5 % of L_sup + n (swapped sizes: 0.025)
    assert qar.qar_balance.averages() == pytest.approx((0.8, 0.4))
    for step in (0, 10, 20, 40):
        for t in (qar, qw, meta, plain_meta):
            t.ssl_step = step
        ramp = sigmoid_rampup(step, 20)
        assert qar.current_qar_weight() == pytest.approx(0.1 * ramp)
        assert meta.current_qar_weight() == pytest.approx(0.1 * ramp)
        # PL-QW follows the host's lambda: ramp * 0.2 * 0.8 / 0.3 (not the official 0.25 linear ramp)
        assert qw.current_qar_weight() == 0.0 and qw.current_lambda() == pytest.approx(ramp * 0.2 * 0.8 / 0.3)
        assert qar.current_lambda() == pytest.approx(ramp * 0.2 * 0.8 / 0.3)
        assert meta.current_lambda() == pytest.approx(plain_meta.current_lambda())
    qar.ssl_step = 40
    qar.max_qar_weight = 0.03
    assert qar.current_qar_weight() == pytest.approx(0.03)  # the cap
    assert qw.qar_balance.steps == 0  # only QAR feeds its balance


def test_pl_qw_gate_and_weights_for_given_quality_in_both_presets(copy_planned, monkeypatch):
    budget_split(copy_planned)
    roots = (copy_planned["root"], copy_planned["dataset"])
    torch.manual_seed(0)
    student = torch.randn(3, 3, 4, 4, 4, requires_grad=True)
    reference = torch.randn(3, 3, 4, 4, 4)
    labels = reference.argmax(1)
    image = torch.randn(3, 1, 4, 4, 4)
    # each sample's own loss l_b (a single sample's weight cancels)
    per_sample = [qg.quality_weighted_pseudo_label_loss(student[b:b + 1].detach(), labels[b:b + 1],
                                                        torch.ones(1, 2), tau=0.0).item() for b in range(3)]
    # sample means 0.25, 0.15, 0.4 (batch mean 0.8 / 3), then 0.9, 0.45, 0.3 (batch mean 0.55)
    batches = [torch.tensor([[0.3, 0.2], [0.1, 0.2], [0.4, 0.4]]), torch.tensor([[0.9, 0.9], [0.45, 0.45], [0.3, 0.3]])]
    m2 = (0.99 * 0.8 / 3 + 0.55) / 1.99  # bias-corrected EMA after both batches
    expected = {
        # paper: tau = 0.5 drops the whole first batch (loss 0); keeps only 0.9 of the second
        "paper": [(0.5, 0.0, 0.0), (0.5, 1 / 3, per_sample[0])],
        # ours: tau_t = min(0.5, m_t) keeps the best of the first batch (0.4 >= 0.267), then 0.9 and 0.45 (>= 0.409)
        # with weights 0.9^2 and 0.45^2
        "default": [(0.8 / 3, 1 / 3, per_sample[2]),
                    (m2, 2 / 3, (0.81 * per_sample[0] + 0.2025 * per_sample[1]) / (0.81 + 0.2025))],
    }
    for preset, rows in expected.items():
        monkeypatch.setenv(ENV_PRESET, preset)
        trainer = make_trainer(nnUNetTrainerMeanTeacherQW, *roots, monkeypatch)
        for q, (tau, kept, loss_value) in zip(batches, rows):
            trainer.quality_predictor = lambda image, mask, q=q: q
            step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={"view0": image, "view1": image},
                           lam=0.1, student_image=image)
            loss, stats = trainer.unsupervised_loss(student, reference, step)
            assert stats["quality_threshold"] == pytest.approx(tau), preset
            assert stats["quality_kept"] == pytest.approx(kept), preset
            assert loss.item() == pytest.approx(loss_value, rel=1e-5, abs=1e-7), preset
            assert not step.scheduled_losses  # no QAR on this trainer
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.all(grad[2] == 0) and grad[0].abs().sum() > 0  # the dropped 0.3 gets no gradient
        assert trainer.quality_threshold.steps == (2 if preset == "default" else 0)
        assert trainer.current_qw_threshold() == pytest.approx(rows[-1][0])
    # g scores the pseudo-label on the image the teacher saw: view 1, or view 0 + noise under the paper's teacher
    views = {"view0": torch.zeros(1, 1, 4, 4, 4), "view1": torch.ones(1, 1, 4, 4, 4)}
    step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views=views, lam=0.1)
    assert trainer.quality_reference_image(step) is views["view1"]
    trainer.teacher_input = "noise"
    step.reference_image = trainer.teacher_image(step)
    assert trainer.quality_reference_image(step) is step.reference_image
    assert 0 < step.reference_image.abs().max() <= 0.2 + 1e-6


def test_warnings_for_a_gate_that_keeps_nothing_and_a_negligible_qar(copy_planned, monkeypatch):
    budget_split(copy_planned)
    roots = (copy_planned["root"], copy_planned["dataset"])
    means = {"ssl_ramp": 1.0, "ssl_unsup_share": 0.2, "ssl_other_share": 0.004, "ssl_coverage": 0.5,
             "ssl_quality_kept": 0.006, "ssl_quality_threshold": 0.5, "ssl_quality_reference": 0.312}
    for preset in ("default", "paper"):
        monkeypatch.setenv(ENV_PRESET, preset)
        both = make_trainer(nnUNetTrainerMeanTeacherQualityGuided, *roots, monkeypatch)
        qar = make_trainer(nnUNetTrainerMeanTeacherQAR, *roots, monkeypatch)
        for t in (both, qar):
            t.ssl_step = t.total_iterations  # both QAR ramps at 1
        warnings = both.mechanism_warnings(means)
        assert len(warnings) == 2, preset
        assert warnings[0] == ("the PL-QW gate kept 0.6% of the samples this epoch (q >= tau, tau 0.500, mean "
                               "predicted Dice of the pseudo-labels 0.312): PL-QW drops nearly every pseudo-label")
        assert warnings[1] == "lambda_QAR L_QAR is 0.004 of the supervised loss this epoch: QAR is negligible"
        # above 1 % kept, and a QAR term of 5 %: nothing
        assert both.mechanism_warnings({**means, "ssl_quality_kept": 0.011, "ssl_other_share": 0.05}) == []
        # QAR alone: its kept fraction (logged only) is no gate
        assert qar.mechanism_warnings(means) == [warnings[1]]
        # early in QAR's ramp a small term is intended; the starved gate is reported at once
        both.ssl_step = 0
        assert both.mechanism_warnings(means) == [warnings[0]]
    # the host's lines come first (a negligible unsupervised term)
    assert both.mechanism_warnings({**means, "ssl_unsup_share": 0.001})[0].startswith("lambda L_unsup is 0.001")


def test_metassl_combination_with_unit_weights_is_metassl(copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(nnUNetTrainerMeanTeacherQualityGuidedMetaSSL, copy_planned["root"],
                           copy_planned["dataset"], monkeypatch)
    _save_untrained_predictor(trainer)
    trainer.initialize()
    torch.manual_seed(0)
    shape = (2, 3, *trainer.configuration_manager.patch_size)
    student, reference = torch.randn(shape), torch.randn(shape)
    image = torch.randn(2, 1, *shape[2:])
    step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={"view0": image, "view1": image}, lam=0.1,
                   student_image=image)
    plain: MetaSSLLoss = copy.deepcopy(trainer.metassl_losses[0])
    expected, expected_stats = plain.unlabeled(student, reference)
    trainer.qw_threshold, trainer.qw_temperature = 0.0, 0.0  # every voxel weight 1
    loss, stats = trainer.unsupervised_loss(student, reference, step)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert {f"u_{k}": v for k, v in expected_stats.items()} == pytest.approx({k: v for k, v in stats.items()
                                                                              if k.startswith("u_")})
    # a sample whose pseudo-label is predicted bad drops out of MetaSSL's loss
    trainer.qw_threshold, trainer.qw_temperature = 0.5, 2.0
    trainer.quality_predictor = lambda image, mask: torch.tensor([[0.9, 0.8], [0.1, 0.2]])
    student.requires_grad_(True)
    loss, stats = trainer.unsupervised_loss(student, reference, step)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0
    assert stats["quality_kept"] == 0.5
    # QAR from the first step on the common ramp, at qar_weight before the loss sizes are known: 0.01 exp(-5) (1 - q)
    assert len(step.scheduled_losses) == 2
    assert trainer.current_qar_weight() == pytest.approx(0.01 * math.exp(-5))
    assert step.scheduled_losses[-1].item() == pytest.approx(0.01 * math.exp(-5) * 0.5)


@pytest.mark.parametrize("cls", [nnUNetTrainerMeanTeacherQAR, nnUNetTrainerMeanTeacherQW,
                                 nnUNetTrainerMeanTeacherQualityGuidedMetaSSL])
def test_one_step_of_each_trainer_logs_quality(cls, copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=1, iterations=1)
    _save_untrained_predictor(trainer)
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        out = trainer.train_step(next(trainer.dataloader_train))
        assert torch.isfinite(torch.as_tensor(out["loss"]))
        trainer.on_train_epoch_end([out])
        logged = trainer.logger.local_logger.my_fantastic_logging
        for key in ("ssl_quality_student", "ssl_quality_reference", "ssl_quality_kept", "ssl_quality_threshold",
                    "ssl_qar_weight"):
            assert len(logged[key]) == 1 and 0.0 <= logged[key][0] <= 1.0, key
        # the default preset: QAR's balance saw this step's sizes; PL-QW's threshold is at most the batch mean
        assert trainer.qar_balance.steps == int(trainer.quality_qar)
        assert trainer.quality_threshold.steps == int(trainer.quality_qw)
        if trainer.quality_qw:
            assert logged["ssl_quality_threshold"][0] == pytest.approx(min(0.5, trainer.quality_threshold.mean()))
            assert logged["ssl_quality_kept"][0] > 0  # the best sample of the first batch passes
        if cls is nnUNetTrainerMeanTeacherQualityGuidedMetaSSL:
            assert sum(logged[f"ssl_u_frac_{r}"][0] for r in ("uc", "us", "dc", "ds")) == pytest.approx(1.0)
        panels = dict(trainer.ssl_plot_panels())
        assert "predicted quality (Dice)" in panels and ("QAR weight" in panels) == trainer.quality_qar
    finally:
        trainer.on_train_end()


# ---------------------------------------------------------------------- command line (slow)
QUALITY_CLI_FAST = ["--iterations", "2", "--batch-size", "2", "--weak-epochs", "1", "--weak-iterations-per-epoch",
                    "1", "--val-samples", "4", "--max-features", "8", "-device", "cpu"]


def _train_quality_train_predict(root, dataset_id: int, dataset: str, trainer: str, predict_input) -> None:
    """nnUNetv2_ssl_train_quality for 2 iterations, then nnUNetv2_train for 1 epoch of 2 iterations (the in-process
    tests cover --c), then nnUNetv2_predict with the final checkpoint."""
    import SimpleITK as sitk
    from conftest import nnunet_env, run_cli

    (root / "results").mkdir(exist_ok=True)
    env = nnunet_env(root, training=True)
    env.pop(ENV_QUALITY_CHECKPOINT, None)
    env.update(nnUNet_ssl_epochs="1", nnUNet_ssl_iterations_per_epoch="2", nnUNet_ssl_val_iterations="1",
               nnUNet_ssl_seed="0")
    run_cli(["nnUNetv2_ssl_train_quality", "-d", str(dataset_id), "-c", "3d_fullres", "-f", "0", *QUALITY_CLI_FAST],
            env=env)
    predictor_file = root / "results" / dataset / "nnUNetSSLQuality__nnUNetPlans__3d_fullres" / "fold_0" / \
        "checkpoint_quality.pth"
    digest = file_sha256(predictor_file)

    train = run_cli(["nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env=env)
    assert f"quality predictor: {predictor_file}" in train.stdout
    out = root / "results" / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    for f in ("checkpoint_final.pth", "checkpoint_final_teacher.pth", "progress_ssl.png", "validation/summary.json"):
        assert (out / f).is_file(), f
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the predictor file is recorded, unchanged by training, and not part of the network weights
    assert final["ssl_state"]["quality_predictor"]["sha256"] == digest == file_sha256(predictor_file)
    assert final["ssl_state"]["ssl_step"] == 2
    assert not any(k.startswith("head.") for k in final["network_weights"])
    for key in ("ssl_quality_student", "ssl_quality_reference", "ssl_quality_kept", "ssl_qar_weight"):
        assert len(final["logging"][key]) == 1 and 0.0 <= final["logging"][key][0] <= 1.0, key

    pred = root / "pred"
    run_cli(["nnUNetv2_predict", "-i", str(predict_input), "-o", str(pred), "-d", str(dataset_id), "-c", "3d_fullres",
             "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env=env)
    images = sorted(predict_input.glob("*_0000.nii.gz"))
    assert images
    for img in images:
        seg = sitk.ReadImage(str(pred / img.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == sitk.ReadImage(str(img)).GetSize()


@pytest.mark.slow
def test_train_quality_then_qw_from_the_command_line(synthetic_planned, tmp_path):
    import shutil

    from conftest import nnunet_env, run_cli

    for sub in ("raw", "preprocessed"):
        shutil.copytree(synthetic_planned["root"] / sub, tmp_path / sub)
    ds = synthetic_planned["dataset"]
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "3", "--seed", "0"],
            env=nnunet_env(tmp_path, training=False))
    _train_quality_train_predict(tmp_path, 990, ds, "nnUNetTrainerMeanTeacherQW", tmp_path / "raw" / ds / "imagesTs")


@pytest.mark.slow
@pytest.mark.realdata
def test_train_quality_then_quality_guided_on_hippocampus(tmp_path):
    """5 training cases of the MSD Hippocampus copy (3 labeled, the rest unlabeled by the budget split) and one
    more training case to predict; the held-out test cases are never used."""
    import json
    import shutil

    from conftest import HIPPOCAMPUS, lower_batch_size, nnunet_env, run_cli

    if not HIPPOCAMPUS.is_dir():
        pytest.skip("../shared/data/Dataset004_Hippocampus not found")
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*_0000.nii.gz"))
    ds = "Dataset004_Hippocampus"
    raw = tmp_path / "raw" / ds
    for sub in ("imagesTr", "labelsTr", "predict"):
        (raw / sub).mkdir(parents=True)
    for case in cases[:5]:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr")
    shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{cases[5]}_0000.nii.gz", raw / "predict")
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    meta["numTraining"] = 5
    (raw / "dataset.json").write_text(json.dumps(meta))
    env = nnunet_env(tmp_path, training=False)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env=env)
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "4", "--num-labeled", "3"], env=env)
    lower_batch_size(tmp_path / "preprocessed" / ds)
    _train_quality_train_predict(tmp_path, 4, ds, "nnUNetTrainerMeanTeacherQualityGuided", raw / "predict")
