"""Each function of nnunet_ssl.compat.trainer against the installed nnU-Net and torch.

The CPU/gloo DDP functions (``gloo_on_cpu``, ``keep_cpu_device``, ``initialize_on_cpu_ddp``, ``wrap_for_ddp``) need
two processes: ``tests/e2e/test_ddp.py`` runs them through a real two-rank training. ``stop_augmenter`` is checked
with real worker processes in ``tests/trainers/test_base.py``."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from helpers import make_trainer
from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_ssl.compat.trainer import (
    INFERENCE_KEYS,
    FeatureTaps,
    atomic_save,
    ensure_log_keys,
    feature_taps,
    log_history,
    network_swapped,
    nnunet_checkpoint,
    set_deep_supervision,
    should_compile,
    unwrap,
    write_inference_checkpoint,
)
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.trainers import nnUNetTrainerSupervised
from nnunet_ssl.trainers.base import full_resolution, split_batch


def test_unwrap_and_batch_helpers():
    net = nn.Linear(2, 2)
    assert unwrap(torch.compile(net)) is net  # compile is lazy: no compilation happens here
    assert unwrap(net) is net
    outputs = [torch.arange(6.0).reshape(3, 2), torch.arange(3.0).reshape(3, 1)]
    head, tail = split_batch(outputs, 2)
    assert [t.shape[0] for t in head] == [2, 2] and [t.shape[0] for t in tail] == [1, 1]
    assert full_resolution(outputs) is outputs[0] and full_resolution(outputs[1]) is outputs[1]


def test_extra_log_keys_are_logged_plotted_and_checkpointed_by_nnunets_logger(tmp_path):
    class Holder:
        logger = MetaLogger(str(tmp_path), False)

    holder = Holder()
    ensure_log_keys(holder, ["ssl_x"])
    holder.logger.log("ssl_x", 0.5, 0)  # nnU-Net's logger refuses keys it does not know
    assert log_history(holder)["ssl_x"] == [0.5]
    assert holder.logger.get_checkpoint()["ssl_x"] == [0.5]
    ensure_log_keys(holder, ["ssl_x"])  # idempotent: keeps the values
    assert log_history(holder)["ssl_x"] == [0.5]


def test_trainer_internals(copy_planned, monkeypatch, tmp_path):
    trainer = make_trainer(nnUNetTrainerSupervised, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    assert should_compile(trainer) is False  # nnU-Net never compiles on CPU

    # configure_optimizers reads only self.network: a swap gives an optimizer over the other network
    other = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                               trainer.num_input_channels,
                                               trainer.label_manager.num_segmentation_heads, True)
    student = trainer.network
    with network_swapped(trainer, other):
        optimizer, _ = trainer.configure_optimizers()
    assert trainer.network is student
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in other.parameters()}

    x = torch.zeros(1, 1, *trainer.configuration_manager.patch_size)
    assert isinstance(other(x), (list, tuple))
    set_deep_supervision(other, False)
    assert isinstance(other(x), torch.Tensor)

    # nnunet_checkpoint is exactly the dict nnU-Net's own save_checkpoint writes
    own = tmp_path / "own.pth"
    nnUNetTrainer.save_checkpoint(trainer, str(own))
    written = torch.load(own, map_location="cpu", weights_only=False)
    built = nnunet_checkpoint(trainer)
    assert set(built) == set(written)
    for key, value in written.items():
        if key == "network_weights":
            assert all(torch.equal(built[key][k].cpu(), v) for k, v in value.items())
        elif key != "optimizer_state":
            assert built[key] == value, key
    assert built["optimizer_state"]["param_groups"] == written["optimizer_state"]["param_groups"]

    # atomic_save: with extra keys, no temporary file left, loadable by nnU-Net's load_checkpoint
    final = tmp_path / "checkpoint_final.pth"
    atomic_save({**built, "ssl_state": {"ssl_step": 7}}, str(final))
    saved = torch.load(final, map_location="cpu", weights_only=False)
    assert saved["ssl_state"] == {"ssl_step": 7} and not list(tmp_path.glob(".*.tmp"))
    nnUNetTrainer.load_checkpoint(trainer, str(final))

    # an extra inference checkpoint has exactly what nnU-Net's predictor reads
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in other.state_dict().items()}
    extra = tmp_path / "checkpoint_final_other.pth"
    write_inference_checkpoint(str(final), str(extra), weights, trainer_name="nnUNetTrainerSupervised")
    checkpoint = torch.load(extra, map_location="cpu", weights_only=False)
    assert set(checkpoint) == {*INFERENCE_KEYS, "network_weights"}
    assert all(torch.equal(checkpoint["network_weights"][k], v) for k, v in weights.items())
    assert checkpoint["init_args"] == saved["init_args"]


def test_predictor_loads_an_inference_checkpoint(copy_planned, monkeypatch, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ssl.cli.trainers import ext_trainer_path

    trainer = make_trainer(nnUNetTrainerSupervised, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        src = copy_planned["root"] / "preprocessed" / copy_planned["dataset"] / (
            "nnUNetPlans.json" if name == "plans.json" else name)
        (folder / name).write_text(src.read_text())
    trainer.save_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    weights = {k: v * 0 + 0.25 if v.is_floating_point() else v for k, v in unwrap(trainer.network).state_dict().items()}
    write_inference_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"),
                               str(folder / "fold_0" / "checkpoint_final_extra.pth"), weights)
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False)
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())  # the predictor finds the trainer class by name
    predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final_extra.pth")
    loaded = predictor.list_of_parameters[0]
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def _small_unet(cls, conv_op, deep_supervision=False):
    """A three-stage PlainConvUNet or ResidualEncoderUNet as nnU-Net's plans build them, with 4/8/16 features."""
    dims = 2 if conv_op is nn.Conv2d else 3
    blocks = {"n_conv_per_stage": 1} if cls is PlainConvUNet else {"n_blocks_per_stage": 1}
    return cls(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv_op, kernel_sizes=3,
               strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
               norm_op=nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision, **blocks)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
@pytest.mark.parametrize("conv_op, spatial", [(nn.Conv2d, (12, 16)), (nn.Conv3d, (8, 12, 16))])
def test_feature_taps_return_the_bottleneck_and_the_last_decoder_stage(cls, conv_op, spatial):
    torch.manual_seed(0)
    net = _small_unet(cls, conv_op)
    x = torch.randn(2, 1, *spatial)
    with feature_taps(net) as taps:
        out = net(x)
    high, low = taps.read()
    bottleneck = tuple(n // 4 for n in spatial)
    assert high.shape == (2, 16, *bottleneck) and low.shape == (2, 4, *spatial)
    with torch.no_grad():
        assert torch.allclose(high, net.encoder(x)[-1])  # the encoder's last skip
        assert torch.allclose(net.decoder.seg_layers[-1](low), out)  # what the segmentation head reads
    assert high.requires_grad and low.requires_grad  # features of a training forward keep their graph
    assert all(not m._forward_hooks for m in net.modules())  # no hooks left behind


def test_feature_taps_unwrap_record_only_while_armed_and_refuse_other_networks():
    net = _small_unet(PlainConvUNet, nn.Conv2d, deep_supervision=True)
    taps = FeatureTaps(torch.compile(net))  # compile is lazy: the hooks sit on the plain module
    assert taps.modules["high"] is net.encoder.stages[-1] and taps.modules["low"] is net.decoder.stages[-1]
    x = torch.randn(1, 1, 8, 8)
    net(x)
    assert taps.features == {}  # disarmed: nothing recorded
    with pytest.raises(SSLInputError, match="nnUNet_compile=f"):
        taps.read()
    with taps.capture() as features:
        outputs = net(x)
    assert set(features) == {"high", "low"} and features["low"].shape == outputs[0].shape[:1] + (4, 8, 8)
    taps.remove()
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(SSLInputError, match="PlainConvUNet or ResidualEncoderUNet"):
        FeatureTaps(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_feature_taps_registered_before_compilation_record_through_torch_compile():
    # Dynamo ignores hooks added after a module's first compiled call; taps registered before it are traced, one
    # graph per armed state (aot_eager: Dynamo and AOTAutograd as in nnU-Net's compile, without code generation)
    net = _small_unet(PlainConvUNet, nn.Conv2d, deep_supervision=True)
    taps = FeatureTaps(net)
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        compiled(x)  # a validation forward, disarmed
    assert taps.features == {}
    with taps.capture():
        compiled(x)
    high, low = taps.read()
    low.abs().mean().backward()
    assert float(net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        assert torch.allclose(high, net.encoder(x)[-1], atol=1e-5)
