"""nnU-Net's two U-Nets as each other's partner: the second network of hosts that pair different architectures."""

from __future__ import annotations

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ssl.errors import SSLInputError

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
#: encoder residual blocks per stage of nnU-Net's ResEnc presets (nnUNetPlannerResEnc{M,L,XL}): ResNet34-like
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
#: decoder convolutions per stage of nnU-Net's ResEnc presets
RESENC_DECODER_CONVS = 1
#: encoder/decoder convolutions per stage of nnU-Net's default (PlainConvUNet) planner
PLAIN_CONVS = 2


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def other_unet_architecture(configuration_manager: ConfigurationManager) -> tuple[str, dict]:
    """(class name, init kwargs) of the partner network: the other of nnU-Net's two U-Nets, with the plans'
    patch size, kernel sizes, strides, features per stage, normalisation and non-linearity.

    Plans with a PlainConvUNet (nnU-Net's default) give a ResidualEncoderUNet with the ResEnc presets' blocks per
    encoder stage (1, 3, 4, 6, 6, ...: a ResNet34-like encoder, as the paper's 3D-ResVNet) and one convolution per
    decoder stage; ResEnc plans give a PlainConvUNet with nnU-Net's default two convolutions per stage. Other
    architectures are refused: there is no principled 'different' network to pair them with."""
    name = configuration_manager.network_arch_class_name
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    n_stages = int(kwargs["n_stages"])
    if _short(name) == "PlainConvUNet":
        kwargs.pop("n_conv_per_stage")
        kwargs["n_blocks_per_stage"] = list(RESENC_BLOCKS_PER_STAGE[:n_stages])
        kwargs["n_conv_per_stage_decoder"] = [RESENC_DECODER_CONVS] * (n_stages - 1)
        return RESENC_UNET, kwargs
    if _short(name) == "ResidualEncoderUNet":
        for key in ("n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"):
            kwargs.pop(key, None)
        kwargs["n_conv_per_stage"] = [PLAIN_CONVS] * n_stages
        kwargs["n_conv_per_stage_decoder"] = [PLAIN_CONVS] * (n_stages - 1)
        return PLAIN_UNET, kwargs
    raise SSLInputError(f"nnUNetTrainerMEDL pairs nnU-Net's PlainConvUNet and ResidualEncoderUNet; the plans use "
                        f"{name}: train with nnU-Net's default plans or a ResEnc preset")


def build_other_unet(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                     num_input_channels: int, num_output_channels: int,
                     enable_deep_supervision: bool = True) -> nn.Module:
    """The other U-Net (:func:`other_unet_architecture`), built and initialised as nnU-Net builds its own."""
    name, kwargs = other_unet_architecture(configuration_manager)
    return get_network_from_plans(name, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)
