"""Every trainer that ``nnUNetv2_train -tr NAME`` accepts, one line each: name = plug-ins + host.

Hosts (``trainers/hosts/``) decide where the reference prediction comes from; plug-ins (``trainers/plugins/``)
decide how each voxel of the two predictions is used. A catalogue line only composes them: its docstring is the line
that ``nnUNetv2_ssl_trainers`` prints, the method's paper, equations and deviations are on the host or plug-in.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.trainers.baselines import Reseeded, SupervisedBaseline
from nnunet_ssl.trainers.hosts.abd import AdaptiveBidirectionalDisplacement as ABD
from nnunet_ssl.trainers.hosts.abd import ConfidenceAwareDisplacement as CAD
from nnunet_ssl.trainers.hosts.ad_mt import AlternateDiverseTeachers as ADMT
from nnunet_ssl.trainers.hosts.bcp import BidirectionalCopyPaste as BCP
from nnunet_ssl.trainers.hosts.c3s3 import ComplementaryCompetition as C3S3
from nnunet_ssl.trainers.hosts.cps import CrossPseudoSupervision as CPS
from nnunet_ssl.trainers.hosts.cross_dimension import CrossDimensionCoTraining as MandN
from nnunet_ssl.trainers.hosts.fixmatch import FixMatch
from nnunet_ssl.trainers.hosts.m3hl import MutualMaskMixFeatures as M3HL
from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher
from nnunet_ssl.trainers.hosts.mlb_seg import MetaLearnedBootstrapping as MLBSeg
from nnunet_ssl.trainers.hosts.two_networks import SecondNetworkForInference, TwoNetworks
from nnunet_ssl.trainers.hosts.ua_mt import UncertaintyAwareMeanTeacher as UAMT
from nnunet_ssl.trainers.plugins.evidential import MutualEvidential
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.plugins.quality import QAR, QW, QualityGuided
from nnunet_ssl.trainers.plugins.self_paced_contrastive import SelfPacedContrastive as SPCL
from nnunet_ssl.trainers.plugins.semantic_augmentation import TransferableSemanticAugmentation as TSA
from nnunet_ssl.trainers.plugins.shape_prior import EllipseShapePrior as ERSR


# baselines
class nnUNetTrainerSupervised(SupervisedBaseline): """nnU-Net's trainer, with the schedule and seed overrides."""
class nnUNetTrainerSupervisedReseeded(Reseeded, nnUNetTrainerSupervised): """The baseline, seed + 1000: noise."""

# hosts with their own loss
class nnUNetTrainerMeanTeacher(MeanTeacher): """EMA teacher, softmax-MSE consistency on two aligned views."""
class nnUNetTrainerFixMatch(FixMatch): """Confident weak-view pseudo-labels supervise a strong, CutMixed view."""
class nnUNetTrainerCPS(CPS): """Cross Pseudo Supervision: two nnU-Nets learn from each other's argmax."""
class nnUNetTrainerUAMT(UAMT): """Uncertainty-aware Mean Teacher: consistency only where the teacher is certain."""
class nnUNetTrainerADMT(ADMT): """AD-MT: two EMA teachers, updated alternately, fused by their entropy."""
class nnUNetTrainerBCP(BCP): """BCP: labeled and unlabeled patches copy-pasted both ways, EMA-teacher labels."""
class nnUNetTrainerM3HL(M3HL): """M3HL: complementary block masks mix labeled and unlabeled; EMA-teacher features."""
class nnUNetTrainerABD(ABD): """ABD: two nets; each view's least confident patch replaced by a confident one."""
class nnUNetTrainerCAD(CAD): """CAD: ABD displacing the largest low-confidence region, thresholds rising."""
class nnUNetTrainerMLBSeg(MLBSeg): """MLB-Seg: per-voxel weights of two label maps learned by a look-ahead step."""
class nnUNetTrainerMandN(MandN): """M&N: a 2D and the 3D network co-trained on each other's soft labels."""

# MetaSSL's heterogeneous loss on each host
class nnUNetTrainerMeanTeacherMetaSSL(MetaSSL, MeanTeacher): """MetaSSL's UC/US/DC/DS loss, EMA teacher."""
class nnUNetTrainerFixMatchMetaSSL(MetaSSL, FixMatch): """MetaSSL's UC/US/DC/DS loss, weak/strong views."""
class nnUNetTrainerCPSMetaSSL(MetaSSL, CPS): """MetaSSL's UC/US/DC/DS loss, both CPS directions."""
class nnUNetTrainerUAMTMetaSSL(MetaSSL, UAMT): """MetaSSL's UC/US/DC/DS loss, uncertainty-aware teacher."""
class nnUNetTrainerADMTMetaSSL(MetaSSL, ADMT): """MetaSSL's UC/US/DC/DS loss, AD-MT's fused teachers."""
class nnUNetTrainerBCPMetaSSL(MetaSSL, BCP): """MetaSSL's UC/US/DC/DS loss on BCP's mixed images."""
class nnUNetTrainerM3HLMetaSSL(MetaSSL, M3HL): """MetaSSL's UC/US/DC/DS loss on M3HL's block-mixed images."""
class nnUNetTrainerABDMetaSSL(MetaSSL, ABD): """MetaSSL's UC/US/DC/DS loss, both networks, plain and displaced."""
class nnUNetTrainerCADMetaSSL(MetaSSL, CAD): """MetaSSL's UC/US/DC/DS loss, both networks, CAD's displacement."""

# QG-SSL's quality guidance (train the predictor first: nnUNetv2_ssl_train_quality)
class nnUNetTrainerMeanTeacherQAR(QAR, MeanTeacher): """Mean Teacher plus QG-SSL's quality-aware regulariser."""
class nnUNetTrainerMeanTeacherQW(QW, MeanTeacher): """QG-SSL's quality-weighted teacher pseudo-labels (PL-QW)."""
class nnUNetTrainerMeanTeacherQualityGuided(QualityGuided, MeanTeacher): """QAR and PL-QW, each with its ramp."""
class nnUNetTrainerMeanTeacherQualityGuidedMetaSSL(QualityGuided, MetaSSL, MeanTeacher): """MetaSSL x quality."""

# feature-level and shape plug-ins on Mean Teacher
class nnUNetTrainerMeanTeacherTransMedSeg(TSA, MeanTeacher): """TransMedSeg: features moved toward the other domain."""
class nnUNetTrainerMeanTeacherERSR(ERSR, MeanTeacher): """ERSR: scored, ellipse-refined teacher labels (2D)."""
class nnUNetTrainerMeanTeacherSelfPacedContrastive(SPCL, MeanTeacher): """Meta-label SupCon, self-paced."""

# evidence from two networks of different architectures
class nnUNetTrainerMEDL(MutualEvidential, TwoNetworks): """Mutual evidential learning, PlainConv + ResEnc U-Net."""
class nnUNetTrainerMEDLNet2(SecondNetworkForInference, nnUNetTrainerMEDL): """Predicts with MEDL's network 2."""
class nnUNetTrainerC3S3(C3S3): """C3S3: the better of two U-Nets teaches the other; contrastive voxel features."""
class nnUNetTrainerC3S3MetaSSL(MetaSSL, C3S3): """MetaSSL's UC/US/DC/DS loss, C3S3's winner as the reference."""
class nnUNetTrainerC3S3Net2(SecondNetworkForInference, nnUNetTrainerC3S3): """Predicts with C3S3's network 2."""

__all__ = sorted(name for name, obj in list(globals().items())
                 if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == __name__)
