"""Entry point of one rank in the two-process gloo DDP test (a module of its own so spawn can import it)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from torch import distributed as dist


class _Recorder:
    """Wraps the unlabeled augmenter and remembers what this rank drew."""

    def __init__(self, inner):
        self.inner = inner
        self.sums: list[float] = []

    def __next__(self):
        batch = next(self.inner)
        self.sums.append(float(batch["view0"].double().sum()))
        return batch

    def _finish(self):
        if hasattr(self.inner, "_finish"):
            self.inner._finish()


def _tensors(state, prefix: str = "") -> dict:
    out = {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v.detach().cpu()
        elif isinstance(v, (dict, list, tuple)):
            out.update(_tensors(v, f"{prefix}{k}."))
    return out


def run_rank(rank: int, world: int, root: str, dataset: str, port: int, out_dir: str,
             trainer_name: str = "nnUNetTrainerMeanTeacher") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), nnUNet_raw=f"{root}/raw",
                      nnUNet_preprocessed=f"{root}/preprocessed", nnUNet_results=f"{root}/results",
                      nnUNet_n_proc_DA="0", nnUNet_compile="f", nnUNet_ssl_epochs="2",
                      nnUNet_ssl_iterations_per_epoch="3", nnUNet_ssl_val_iterations="1", nnUNet_ssl_seed="5")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from nnunet_ssl import trainers
        from nnunet_ssl.compat.trainer import unwrap

        pp = Path(root) / "preprocessed" / dataset
        plans = load_json(str(pp / "nnUNetPlans.json"))
        plans["continue_training"] = False
        trainer = getattr(trainers, trainer_name)(plans, "3d_fullres", 0, load_json(str(pp / "dataset.json")),
                                           torch.device("cpu"))
        make_loader = trainer.get_unlabeled_dataloader
        recorders = []

        def recorded_loader():
            recorders.append(_Recorder(make_loader()))
            return recorders[-1]

        trainer.get_unlabeled_dataloader = recorded_loader
        trainer.run_training()
        torch.save({
            "is_ddp": trainer.is_ddp,
            "ddp_wrapped": isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel),
            "batch_size": trainer.batch_size,
            "loss_ddp": trainer.loss.loss.dc.ddp,  # the batch Dice gathers over ranks, as nnU-Net's DDP loss
            "unlabeled_batch_size": trainer.unlabeled_batch_size_per_rank,
            "reference": {k: v.cpu() for k, v in unwrap(trainer.reference_network()).state_dict().items()},
            # AD-MT's second teacher and the alternation of the two, which each rank draws without communication
            "reference2": {k: v.cpu() for k, v in trainer.teacher2.state_dict().items()}
            if hasattr(trainer, "teacher2") else {},
            "alternation": trainer.alternation.state_dict() if hasattr(trainer, "alternation") else None,
            # C3S3's projector heads, trained beside each network (their own DDP wrappers)
            "projectors": [{k: v.cpu() for k, v in unwrap(p).state_dict().items()}
                           for p in getattr(trainer, "projectors", [])],
            "student": {k: v.cpu() for k, v in unwrap(trainer.network).state_dict().items()},
            "view_sums": recorders[-1].sums,
            "ssl_step": trainer.ssl_step,
            # every tensor of the SSL state (class statistics, second networks, ...), by its flattened key
            "ssl_state": _tensors(trainer.ssl_state_dict()),
            "predictor_wrapped": isinstance(getattr(trainer, "quality_predictor", None),
                                            torch.nn.parallel.DistributedDataParallel),
            "predictor": {k: v.cpu() for k, v in trainer.quality_predictor.state_dict().items()}
            if hasattr(trainer, "quality_predictor") else {},
            "qar_weight": trainer.current_qar_weight() if hasattr(trainer, "current_qar_weight") else None,
        }, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
