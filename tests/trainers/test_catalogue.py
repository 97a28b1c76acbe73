"""The catalogue: every -tr name composes plug-ins and a host in one line, and nnU-Net finds each by name."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from nnunet_ssl import trainers
from nnunet_ssl.cli.trainers import available_trainers
from nnunet_ssl.trainers import catalogue
from nnunet_ssl.trainers.base import nnUNetTrainerSSL
from nnunet_ssl.trainers.hosts.abd import AdaptiveBidirectionalDisplacement, ConfidenceAwareDisplacement
from nnunet_ssl.trainers.hosts.ad_mt import AlternateDiverseTeachers
from nnunet_ssl.trainers.hosts.bcp import BidirectionalCopyPaste
from nnunet_ssl.trainers.hosts.c3s3 import ComplementaryCompetition
from nnunet_ssl.trainers.hosts.cps import CrossPseudoSupervision
from nnunet_ssl.trainers.hosts.cross_dimension import CrossDimensionCoTraining
from nnunet_ssl.trainers.hosts.fixmatch import FixMatch
from nnunet_ssl.trainers.hosts.m3hl import MutualMaskMixFeatures
from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher
from nnunet_ssl.trainers.hosts.mlb_seg import MetaLearnedBootstrapping
from nnunet_ssl.trainers.hosts.two_networks import TwoNetworks
from nnunet_ssl.trainers.hosts.ua_mt import UncertaintyAwareMeanTeacher
from nnunet_ssl.trainers.plugins.evidential import MutualEvidential
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.plugins.quality import QualityGuidance
from nnunet_ssl.trainers.plugins.self_paced_contrastive import SelfPacedContrastive
from nnunet_ssl.trainers.plugins.semantic_augmentation import TransferableSemanticAugmentation
from nnunet_ssl.trainers.plugins.shape_prior import EllipseShapePrior

HOSTS = (MeanTeacher, FixMatch, CrossPseudoSupervision, TwoNetworks, UncertaintyAwareMeanTeacher,
         AlternateDiverseTeachers, BidirectionalCopyPaste, MutualMaskMixFeatures, AdaptiveBidirectionalDisplacement,
         ConfidenceAwareDisplacement, ComplementaryCompetition, MetaLearnedBootstrapping, CrossDimensionCoTraining)
PLUGINS = (MetaSSL, QualityGuidance, MutualEvidential, TransferableSemanticAugmentation, EllipseShapePrior,
           SelfPacedContrastive)


def test_every_catalogue_line_is_one_line_with_an_empty_body():
    source = Path(catalogue.__file__).read_text().splitlines()
    for name in catalogue.__all__:
        cls = getattr(catalogue, name)
        lines, _ = inspect.getsourcelines(cls)
        assert len(lines) == 1, name
        assert sum(line.startswith(f"class {name}(") for line in source) == 1, name
        # a catalogue line composes; it defines nothing of its own
        assert set(vars(cls)) <= {"__module__", "__qualname__", "__doc__", "__firstlineno__", "__static_attributes__"}
        assert cls.__doc__ and len(cls.__doc__) <= 80, name


def test_names_read_host_then_plugins():
    expected = {"MeanTeacher": MeanTeacher, "FixMatch": FixMatch, "CPS": CrossPseudoSupervision,
                "UAMT": UncertaintyAwareMeanTeacher, "ADMT": AlternateDiverseTeachers, "BCP": BidirectionalCopyPaste,
                "M3HL": MutualMaskMixFeatures, "ABD": AdaptiveBidirectionalDisplacement,
                "CAD": ConfidenceAwareDisplacement, "C3S3": ComplementaryCompetition,
                "MLBSeg": MetaLearnedBootstrapping, "MandN": CrossDimensionCoTraining}
    plugin_names = {"MetaSSL": MetaSSL, "QAR": QualityGuidance, "QW": QualityGuidance,
                    "QualityGuided": QualityGuidance, "TransMedSeg": TransferableSemanticAugmentation,
                    "ERSR": EllipseShapePrior, "SelfPacedContrastive": SelfPacedContrastive}
    for name in trainers.__all__:
        cls = getattr(trainers, name)
        if not issubclass(cls, nnUNetTrainerSSL):
            continue
        rest = name.removeprefix("nnUNetTrainer")
        host = next((h for h in expected if rest.startswith(h)), None)
        if host is None:  # a method named by its paper: MEDL on two networks of different architectures
            assert rest.startswith("MEDL") and issubclass(cls, (TwoNetworks, MutualEvidential))
            assert cls.second_network == "other_unet"
            continue
        assert issubclass(cls, expected[host]), name
        for plugin, base in plugin_names.items():
            if plugin in rest.removeprefix(host):
                assert issubclass(cls, base), (name, plugin)
        # plug-ins come before the host in the bases, so they override its hooks
        mro = cls.__mro__
        for base in PLUGINS:
            if issubclass(cls, base):
                assert mro.index(base) < mro.index(expected[host]), name


def test_all_is_derived_from_the_catalogue_and_listed_by_the_command():
    classes = {n for n, v in vars(catalogue).items() if inspect.isclass(v) and v.__module__ == catalogue.__name__}
    assert set(catalogue.__all__) == classes == set(trainers.__all__)
    assert len(classes) == 34
    listed = available_trainers()
    assert set(listed) == classes
    assert listed["nnUNetTrainerCPS"] == catalogue.nnUNetTrainerCPS.__doc__


@pytest.mark.parametrize("name", ["nnUNetTrainerMeanTeacher", "nnUNetTrainerMEDLNet2", "nnUNetTrainerSupervised"])
def test_nnunet_finds_catalogue_trainers_by_name(name, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_ssl.cli.trainers import ext_trainer_path

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())
    assert recursive_find_trainer_class_by_name(name) is getattr(trainers, name)
