"""nnU-Net's DDP path with two gloo processes on CPU: one reference model on all ranks, one unlabeled batch per
rank."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from ddp_worker import run_rank
from helpers import case_ids, save_untrained_quality_predictor, write_budget_splits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: prefixes of flattened ``ssl_state_dict()`` keys that must be identical on both ranks (reduced across ranks, or
#: trained under DDP), per trainer
SHARED_STATE: dict[str, tuple[str, ...]] = {"nnUNetTrainerMeanTeacherTransMedSeg": ("semantic_statistics.",),
                                             "nnUNetTrainerMeanTeacherSelfPacedContrastive": ("spcl_heads.",),
                                             "nnUNetTrainerMandN": ("network2_weights", "optimizer2_state"),
                                             "nnUNetTrainerMLBSeg": ("teacher_weights", "initial_weights")}


@pytest.mark.parametrize("trainer", ["nnUNetTrainerMeanTeacher", "nnUNetTrainerCPSMetaSSL", "nnUNetTrainerMEDL",
                                     "nnUNetTrainerMeanTeacherQualityGuided", "nnUNetTrainerADMT",
                                     "nnUNetTrainerC3S3", "nnUNetTrainerM3HL", "nnUNetTrainerMLBSeg",
                                     "nnUNetTrainerMandN", "nnUNetTrainerMeanTeacherTransMedSeg",
                                     "nnUNetTrainerMeanTeacherSelfPacedContrastive"])
def test_ssl_trainer_under_ddp_with_two_gloo_ranks(trainer, copy_planned, tmp_path, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:2], ids[2:4], ids[4:])
    monkeypatch.delenv("nnUNet_ssl_quality_checkpoint", raising=False)
    predictor = save_untrained_quality_predictor(pp, copy_planned["root"] / "results")[1] \
        if "Quality" in trainer else {}
    mp.spawn(run_rank, args=(2, str(copy_planned["root"]), copy_planned["dataset"], _free_port(), str(tmp_path),
                             trainer), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert r["is_ddp"] and r["ddp_wrapped"]
        # the plans' batch of 2 is split over the two ranks, and so is the unlabeled batch
        assert r["batch_size"] == 1 and r["unlabeled_batch_size"] == 1 and r["loss_ddp"]
        assert r["ssl_step"] == 6
    # identical students (DDP) and identical reference models on both ranks: the EMA of identical students, or
    # CPS's second network (its own DDP wrapper)
    for k in r0["student"]:
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    for k in r0["reference"]:
        assert torch.equal(r0["reference"][k], r1["reference"][k]), k
    for k in r0["reference2"]:
        assert torch.equal(r0["reference2"][k], r1["reference2"][k]), k
    shared = [k for k in r0["ssl_state"] if k.startswith(SHARED_STATE.get(trainer, ()))]
    assert len(shared) >= len(SHARED_STATE.get(trainer, ()))
    for k in shared:
        assert torch.equal(r0["ssl_state"][k], r1["ssl_state"][k]), k
    assert r0["alternation"] == r1["alternation"]
    assert len(r0["projectors"]) == (2 if "C3S3" in trainer else 0)
    for p0, p1 in zip(r0["projectors"], r1["projectors"]):
        for k in p0:
            assert torch.equal(p0[k], p1[k]), k
    if "ADMT" in trainer:  # both teachers were updated, in turns of one step (half of a 3-iteration epoch)
        assert r0["reference2"] and r0["alternation"]["switches"] == 6
    # the quality predictor: frozen, never DDP-wrapped, unchanged on every rank; QAR was active by the last step
    for r in (r0, r1):
        assert not r["predictor_wrapped"] and r["predictor"].keys() == predictor.keys()
        for k in predictor:
            assert torch.equal(r["predictor"][k], predictor[k]), k
    if predictor:
        assert r0["qar_weight"] > 0
    # each rank drew its own unlabeled patches
    assert len(r0["view_sums"]) == len(r1["view_sums"]) >= 6
    assert r0["view_sums"] != r1["view_sums"]
    out = copy_planned["root"] / "results" / copy_planned["dataset"] / \
        f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    two_networks = any(name in trainer for name in ("CPS", "MEDL", "C3S3", "ABD", "CAD"))
    extra = "checkpoint_final_net2.pth" if two_networks else \
        "network_2d_final.pth" if "MandN" in trainer else "checkpoint_final_teacher.pth"
    assert (out / "checkpoint_final.pth").is_file() and (out / extra).is_file()
