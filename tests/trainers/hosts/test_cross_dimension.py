"""The M&N host: slice-wise application, the two turns of a step in order (2D from the 3D network, then 3D from the
updated 2D network) with hand-computed losses, the share modes and learning rates, the 2D network's weights from an
nnU-Net 2d checkpoint (given, found or refused) or a torchvision file (LoRA needs peft), a 2D configuration, and one
short training resumed and predicted with both networks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import budget_split, budgeted_trainer, make_trainer, predict_in_process, random_batch, state_copy
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_ssl.compat.networks_2d import SliceWise, build_library_network
from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.hosts.cross_dimension import (
    DIRECTION_2D,
    DIRECTION_3D,
    NETWORK_2D_FINAL,
    CrossDimensionCoTraining,
    distribution_loss,
)

PATCH = (16, 32, 32)


@pytest.fixture(autouse=True)
def _no_user_weights(monkeypatch):
    monkeypatch.delenv("nnUNet_ssl_2d_weights", raising=False)
    monkeypatch.delenv("nnUNet_ssl_settings", raising=False)
    monkeypatch.delenv("nnUNet_ssl_preset", raising=False)


class _Divisible(nn.Module):
    """A 2D network that refuses sizes that are not multiples of 8 and mixes neighbouring pixels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0, x.shape
        return [self.conv(x), self.conv(x)[..., ::2, ::2]]  # deep-supervision style: the first entry is used


def test_slice_wise_applies_the_2d_network_to_every_slice_of_the_first_axis():
    torch.manual_seed(0)
    net = _Divisible()
    wise = SliceWise(net, (8, 8))
    x = torch.randn(2, 2, 5, 12, 16)  # Y = 12 is padded to 16 and cropped back
    out = wise(x)
    assert out.shape == (2, 3, 5, 12, 16)
    for b in range(2):
        for z in range(5):
            padded = F.pad(x[b : b + 1, :, z], [0, 0, 0, 4])
            assert torch.allclose(out[b, :, z], net.conv(padded)[0, :, :12], atol=1e-6), (b, z)
    assert torch.allclose(wise(x[:, :, 0]), out[:, :, 0], atol=1e-6)  # a 2D patch: the same network directly
    wise.output_shapes = [(5, 12, 16), (3, 6, 8)]  # nnU-Net's deep-supervision targets, for validation only
    listed = wise(x)
    assert torch.equal(listed[0], out) and listed[1].shape == (2, 3, 3, 6, 8)
    with pytest.raises(SSLInputError, match="2D or 3D"):
        SliceWise(net)(torch.zeros(2, 2, 8))


def _hand_pseudo_loss(logits: torch.Tensor, reference: torch.Tensor, batch_dice: bool) -> float:
    """nnU-Net's soft Dice (foreground, smooth 1e-5) on soft targets + the per-voxel KL, by hand."""
    p, q = torch.softmax(logits.double(), 1), torch.softmax(reference.double(), 1)
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    inter, sp, sq = (p[:, 1:] * q[:, 1:]).sum(axes), p[:, 1:].sum(axes), q[:, 1:].sum(axes)
    dice = ((2 * inter + 1e-5) / (sp + sq + 1e-5)).mean()
    kl = (q * (q.log() - p.log())).sum(1).mean()
    return float(1 - dice + kl)


def test_step_trains_2d_from_3d_then_3d_from_the_updated_2d(copy_planned, monkeypatch):
    trainer = budgeted_trainer(CrossDimensionCoTraining, copy_planned, monkeypatch, epochs=8)
    trainer.current_epoch = 5  # E_tr = 1: progress 4 / 7
    data, target, views = random_batch(trainer, PATCH, seed=1, labeled=2, unlabeled=2, views=1)
    u = views["view0"]
    with torch.no_grad():
        f3_before = full_resolution(trainer.network(u))
        f2_before = trainer.slicewise(u)
    nets_before = state_copy(unwrap(trainer.network)), state_copy(unwrap(trainer.network2))
    calls = []
    original = CrossDimensionCoTraining.unsupervised_loss

    def recording(self, student, reference, step):
        loss, stats = original(self, student, reference, step)
        calls.append((step.direction, student.detach().clone(), reference.detach().clone(), float(loss.detach())))
        return loss, stats

    monkeypatch.setattr(CrossDimensionCoTraining, "unsupervised_loss", recording)
    trainer.dataloader_unlabeled = iter([views])
    trainer.train_step({"data": data, "target": target})
    # the order: the 2D network's turn first, each on the U unlabeled patches
    assert [c[0] for c in calls] == [DIRECTION_2D, DIRECTION_3D]
    (_, s2, r2, l2), (_, s3, r3, l3) = calls
    # the 2D network learned from the 3D network before its update ...
    assert torch.allclose(r2, f3_before, atol=1e-5) and torch.allclose(s2, f2_before, atol=1e-5)
    # ... and the 3D network from the 2D network after the 2D update (not the one before it)
    with torch.no_grad():
        f2_after = trainer.slicewise(u)
    assert torch.allclose(r3, f2_after, atol=1e-5) and not torch.allclose(r3, f2_before, atol=1e-4)
    assert torch.allclose(s3, f3_before, atol=1e-5)
    batch_dice = trainer.configuration_manager.batch_dice
    assert l2 == pytest.approx(_hand_pseudo_loss(s2, r2, batch_dice), rel=1e-4)
    assert l3 == pytest.approx(_hand_pseudo_loss(s3, r3, batch_dice), rel=1e-4)
    # both networks were updated; the stats are per network and the weight is lambda = p
    for before, net in zip(nets_before, (trainer.network, trainer.network2)):
        assert any(not torch.equal(v, unwrap(net).state_dict()[k]) for k, v in before.items())
    stats = trainer._epoch_stats[-1]
    assert stats["ssl_lambda"] == pytest.approx(4 / 7) and stats["ssl_pseudo_samples"] == 2
    assert stats["ssl_unsup_loss"] == pytest.approx(l3, rel=1e-5)
    assert stats["ssl_unsup_loss_2d"] == pytest.approx(l2, rel=1e-5)
    assert trainer.ssl_step == 1
    # during the warm-up (e < E_tr) no unlabeled patch enters and the pseudo-label term is 0
    calls.clear()
    trainer.current_epoch = 0
    trainer.dataloader_unlabeled = iter([views])
    trainer.train_step({"data": data, "target": target})
    assert calls == [] and trainer._epoch_stats[-1]["ssl_pseudo_samples"] == 0
    assert trainer._epoch_stats[-1]["ssl_unsup_loss"] == 0.0


def test_distribution_loss_is_the_kl_and_zero_at_agreement():
    torch.manual_seed(0)
    z, r = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    q = torch.softmax(r, 1)
    hand = (q * (q.log() - torch.log_softmax(z, 1))).sum(1).mean()
    assert float(distribution_loss(z, q)) == pytest.approx(float(hand), rel=1e-5)
    # the official KLDivLoss(reduction='mean') also averages over the classes
    official = F.kl_div(torch.log_softmax(z, 1), q, reduction="sum") / q.numel()  # torch's 'mean'
    assert float(distribution_loss(z, q, mean_over_classes=True)) == pytest.approx(float(official), rel=1e-5)
    assert float(distribution_loss(r, q)) == pytest.approx(0.0, abs=1e-6)
    s = torch.sigmoid(r)
    assert float(distribution_loss(r, s, regions=True)) == pytest.approx(0.0, abs=1e-6)
    assert float(distribution_loss(z, s, regions=True)) > 0


def test_share_modes_presets_learning_rates_and_cost(copy_planned, monkeypatch):
    budget_split(copy_planned)
    root, name = copy_planned["root"], copy_planned["dataset"]
    default = make_trainer(CrossDimensionCoTraining, root, name, monkeypatch, epochs=16)
    assert default.transition == 2 and default.share_mode == "lambda" and default.optimizer_kind == "sgd"
    for epoch, lam in ((0, 0.0), (2, 0.0), (9, 0.5), (15, 13 / 14)):
        default.current_epoch = epoch
        assert default.current_lambda() == pytest.approx(lam)
        assert default.pseudo_samples(2) == (2 if lam > 0 else 0) and default.supervised_weight() == 1.0
    assert [default.lr_factor(e) for e in (1, 2, 9)] == pytest.approx([0.5 ** 0.9, 1.0, 0.5 ** 0.9])
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(CrossDimensionCoTraining, root, name, monkeypatch, epochs=16)
    for key, value in paper_settings_of(CrossDimensionCoTraining).items():
        assert getattr(paper, key) == value, key
    # the official share of a batch of B = 2 (the plans' global batch): n_p = floor(p 2)
    for epoch, share in ((2, 0.0), (8, 0.0), (9, 0.5), (15, 0.5)):
        paper.current_epoch = epoch
        assert paper.current_lambda() == share and paper.supervised_weight() == 1 - share
        assert paper.pseudo_samples(1) == (1 if share else 0) and paper.pseudo_samples(3) == math.ceil(3 * share)
    paper.warmup_fraction = 0.125  # 0.0125 of 16 epochs rounds to no warm-up: 2 epochs, up to E_tr
    paper.initialize()
    assert isinstance(paper.optimizer, torch.optim.AdamW) and isinstance(paper.optimizer2, torch.optim.AdamW)
    for epoch in (0, 2, 9):
        paper.lr_scheduler.step(epoch)
        paper.lr_scheduler2.step(epoch)
        factor = paper.lr_factor(epoch)
        assert paper.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
        assert paper.optimizer2.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    assert [paper.lr_factor(e) for e in (0, 1, 2, 9)] == pytest.approx([0.01, 0.505, 1.0, 0.5])  # restart at E_tr
    assert CrossDimensionCoTraining.compute_units(2, 2) == 2 * 3 * 4 + 2 * 2
    monkeypatch.delenv("nnUNet_ssl_preset")
    for bad, match in (("share_mode='x'", "share_mode"), ("lr_schedule='cos'", "lr_schedule"),
                       ("transition_fraction=1.0", "transition_fraction"), ("lora_rank=4", "LoRA"),
                       ("calibrate_reference=True", "calibration")):
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=match):
            make_trainer(CrossDimensionCoTraining, root, name, monkeypatch)


def _save_2d_checkpoint(pp: Path, path: Path, configuration: str = "2d", seed: int = 3) -> dict:
    """An nnU-Net checkpoint as nnUNetv2_train DATASET 2d 0 writes it (its keys), with random weights."""
    plans = PlansManager(str(pp / "nnUNetPlans.json"))
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(plans, plans.get_configuration("2d"), 1, 3, True)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer", "current_epoch": 7,
                "init_args": {"plans": plans.plans, "configuration": configuration, "fold": 0}}, path)
    return weights


def test_2d_weights_found_given_or_refused_with_one_line(copy_planned, monkeypatch):
    budget_split(copy_planned)
    root, name = copy_planned["root"], copy_planned["dataset"]
    pp = root / "preprocessed" / name
    found = root / "results" / name / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    weights = _save_2d_checkpoint(pp, found)
    trainer = make_trainer(CrossDimensionCoTraining, root, name, monkeypatch)
    trainer.initialize()
    assert trainer.source_2d["chosen_by"] == "the supervised 2d run of this fold"
    for k, v in unwrap(trainer.network2).state_dict().items():
        assert torch.equal(v, weights[k]), k
    # the unused deep-supervision heads are frozen (DDP), the last head trains
    heads = unwrap(trainer.network2).decoder.seg_layers
    assert not any(p.requires_grad for h in heads[:-1] for p in h.parameters())
    assert all(p.requires_grad for p in heads[-1].parameters())
    given = root / "other.pth"
    other = _save_2d_checkpoint(pp, given, seed=4)
    monkeypatch.setenv("nnUNet_ssl_2d_weights", str(given))
    trainer = make_trainer(CrossDimensionCoTraining, root, name, monkeypatch)
    trainer.initialize()
    assert trainer.source_2d["weights"]["path"] == str(given.resolve())
    assert torch.equal(unwrap(trainer.network2).state_dict()["encoder.stages.0.0.convs.0.conv.weight"],
                       other["encoder.stages.0.0.convs.0.conv.weight"])
    wrong = root / "wrong.pth"
    _save_2d_checkpoint(pp, wrong, configuration="3d_fullres")
    changed = root / "changed.pth"
    _save_2d_checkpoint(pp, changed)
    checkpoint = torch.load(changed, weights_only=False)
    checkpoint["init_args"]["plans"]["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] = 5
    torch.save(checkpoint, changed)
    for path, match in ((root / "missing.pth", "does not exist"), (wrong, "configuration '3d_fullres'"),
                        (changed, "architecture"), (pp / "dataset.json", "cannot be read")):
        monkeypatch.setenv("nnUNet_ssl_2d_weights", str(path))
        with pytest.raises(SSLInputError, match=match):
            make_trainer(CrossDimensionCoTraining, root, name, monkeypatch).initialize()


def test_torchvision_network_from_a_file_and_lora_needs_peft(copy_planned, monkeypatch, tmp_path):
    torch.manual_seed(0)
    source = build_library_network("torchvision:lraspp_mobilenet_v3_large", 1, 5)  # another class count
    file = tmp_path / "natural.pth"
    torch.save({"state_dict": source.encoder.state_dict()}, file)
    monkeypatch.setenv("nnUNet_ssl_settings", f"network_2d='torchvision:lraspp_mobilenet_v3_large', "
                                              f"weights_2d='{file}'")
    trainer = budgeted_trainer(CrossDimensionCoTraining, copy_planned, monkeypatch, epochs=2)
    loaded = trainer.source_2d["weights"]
    assert int(loaded["loaded"]) > 0 and int(loaded["skipped"]) > 0  # the 5-class classifier is skipped
    mine = unwrap(trainer.network2).encoder.state_dict()
    key = next(k for k in mine if k.startswith("backbone") and k.endswith("weight"))
    assert torch.equal(mine[key], source.encoder.state_dict()[key])
    trainer.current_epoch = 1
    data, target, views = random_batch(trainer, PATCH, seed=2, views=1)
    trainer.dataloader_unlabeled = iter([views])
    trainer.train_step({"data": data, "target": target})
    assert math.isfinite(trainer._epoch_stats[-1]["ssl_unsup_loss_2d"])
    try:
        import peft  # noqa: F401
    except ImportError:
        monkeypatch.setenv("nnUNet_ssl_settings", "network_2d='torchvision:lraspp_mobilenet_v3_large', lora_rank=4")
        with pytest.raises(SSLInputError, match="pip install peft"):
            budgeted_trainer(CrossDimensionCoTraining, copy_planned, monkeypatch)
    monkeypatch.setenv("nnUNet_ssl_settings", "network_2d='keras:unet'")
    with pytest.raises(SSLInputError, match="network_2d"):
        budgeted_trainer(CrossDimensionCoTraining, copy_planned, monkeypatch)


def test_timm_encoder_with_the_all_mlp_head_or_one_line_without_timm():
    try:
        import timm  # noqa: F401
    except ImportError:  # timm is optional: one line naming the fix
        with pytest.raises(SSLInputError, match="pip install timm"):
            build_library_network("timm:resnet10t", 1, 3)
        return
    net = build_library_network("timm:resnet10t", 1, 3)
    assert net.head is not None and net(torch.zeros(2, 1, 32, 32)).shape == (2, 3, 32, 32)


def test_lora_adapts_the_encoder_with_peft():
    pytest.importorskip("peft")  # optional dependency; skipped where it is not installed
    from nnunet_ssl.compat.networks_2d import add_lora

    net = build_library_network("torchvision:lraspp_mobilenet_v3_large", 1, 3)
    add_lora(net, 4, 4.0, ("project.0",), 0.0)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and net(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_a_2d_configuration_trains_two_2d_networks(copy_planned, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    planar = budgeted_trainer(CrossDimensionCoTraining, copy_planned, monkeypatch, configuration="2d", epochs=2)
    assert planar.configuration_2d_name == "2d"
    planar.current_epoch = 1
    data, target, views = random_batch(planar, (32, 32), seed=3, labeled=3, unlabeled=2, views=1)
    planar.dataloader_unlabeled = iter([views])
    planar.train_step({"data": data, "target": target})
    stats = planar._epoch_stats[-1]
    assert math.isfinite(stats["ssl_unsup_loss"]) and math.isfinite(stats["ssl_unsup_loss_2d"])
    assert list(planar.extra_final_checkpoints()) == ["checkpoint_final_net2.pth"]


def test_short_training_resumes_and_predicts_with_both_networks(copy_planned, monkeypatch):
    from nnunet_ssl.trainers.catalogue import nnUNetTrainerMandN

    trainer = budgeted_trainer(nnUNetTrainerMandN, copy_planned, monkeypatch, epochs=1, iterations=1)
    trainer.run_training()
    out = Path(trainer.output_folder)
    resumed = budgeted_trainer(nnUNetTrainerMandN, copy_planned, monkeypatch, epochs=2, iterations=1)
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    for k, v in unwrap(trainer.network2).state_dict().items():
        assert torch.equal(unwrap(resumed.network2).state_dict()[k], v), k
    assert resumed.optimizer2.state_dict()["state"].keys() == trainer.optimizer2.state_dict()["state"].keys()
    resumed.run_training()
    assert resumed.ssl_step == 2 and resumed.current_epoch == 2
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["ssl_pseudo_samples"] == [0.0, 2.0]  # E_tr = 0 of 2 epochs: pseudo-labels from epoch 1
    for key in ("ssl_unsup_loss", "ssl_unsup_loss_2d", "ssl_reference_dice", "ssl_confidence_3d"):
        assert math.isfinite(log[key][-1]), key
    assert not (out / "checkpoint_final_net2.pth").exists()
    saved = torch.load(out / NETWORK_2D_FINAL, map_location="cpu", weights_only=False)
    assert saved["init_args"]["configuration"] == "2d" and saved["trainer_name"] == "nnUNetTrainer"
    for checkpoint in ("checkpoint_final.pth", NETWORK_2D_FINAL):
        predictor = predict_in_process(copy_planned, out, checkpoint, monkeypatch)
        assert type(predictor.network).__name__ == "PlainConvUNet"
        assert len(predictor.configuration_manager.patch_size) == (2 if checkpoint == NETWORK_2D_FINAL else 3)
        if checkpoint == NETWORK_2D_FINAL:
            for k, v in predictor.network.state_dict().items():
                assert torch.equal(v.cpu(), saved["network_weights"][k]), k
