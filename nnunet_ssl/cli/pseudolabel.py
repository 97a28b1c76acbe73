"""``nnUNetv2_ssl_pseudolabel``: the command line of offline pseudo-labelling (:mod:`nnunet_ssl.pseudolabel`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_ssl.errors import SSLInputError, exit_code_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_ssl_pseudolabel",
        description="Offline pseudo-labelling with nnU-Net: predict the unlabeled pool with trained models (folds, "
        "checkpoints, model folders), score every case, keep the reliable ones and write a new raw dataset (labeled "
        "cases + pseudo-labeled cases, provenance in pseudolabel.json) that nnU-Net preprocesses and trains. The "
        "source dataset is never written to. With --rounds it also preprocesses and trains the student, repeatedly.")
    p.add_argument("-d", required=True, metavar="DATASET", help="source dataset id or name")
    p.add_argument("-t", required=True, type=int, metavar="ID", help="id of the new dataset (DatasetID_<name>)")
    p.add_argument("--name", default=None, help="name of the new dataset (default <source name>PseudoLabeled)")
    p.add_argument("-o", required=True, metavar="WORK", help="work folder: predictions, scores (resumable)")
    models = p.add_argument_group("teacher models (model folders, or -tr/-p/-c as nnUNetv2_predict)")
    models.add_argument("-m", "--models", nargs="+", default=None, metavar="FOLDER",
                        help="model folders nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>")
    models.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    models.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    models.add_argument("-c", default=None, help="configuration, e.g. 3d_fullres (needed without -m)")
    models.add_argument("-f", nargs="+", default=None, help="folds (default: every fold with the checkpoint); "
                        "several folds give the agreement score")
    models.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                        help="checkpoints; several of one run (e.g. checkpoint_snapshot_1of3.pth "
                        "checkpoint_snapshot_2of3.pth checkpoint_final.pth) give the stability score")
    pool = p.add_argument_group("unlabeled pool")
    pool.add_argument("--split-fold", type=int, default=None, metavar="F",
                      help="use fold F of a label-budget splits_final.json: its unlabeled cases are the pool, its "
                      "train and val cases the labeled ones")
    pool.add_argument("--unlabeled-folder", default=None, help="unlabeled images (default <raw>/imagesUnlabeled)")
    pool.add_argument("--no-images-unlabeled", action="store_true", help="do not use imagesUnlabeled")
    sel = p.add_argument_group("case selection (thresholds, then the best k or a fraction; all scores are written "
                               "whatever is chosen)")
    sel.add_argument("--min-agreement", type=float, default=None, help="mean pairwise Dice between models")
    sel.add_argument("--min-stability", type=float, default=None, help="mean pairwise Dice between checkpoints")
    sel.add_argument("--min-confidence", type=float, default=None, help="mean max-probability on the foreground")
    sel.add_argument("--max-uncertainty", type=float, default=None, help="mean normalised entropy on the foreground")
    sel.add_argument("--min-quality", type=float, default=None, help="quality predictor's predicted Dice")
    sel.add_argument("--max-ignored", type=float, default=None,
                     help="drop cases with more than this share of ignored voxels (see --ignore-below)")
    sel.add_argument("--top-k", type=int, default=None, help="keep at most K cases")
    sel.add_argument("--top-fraction", type=float, default=None, help="keep at most this fraction of the pool")
    sel.add_argument("--rank-by", default=None, help="score ranking the cases for --top-k/--top-fraction")
    sel.add_argument("--quality-predictor", default=None, metavar="PTH",
                     help="checkpoint_quality.pth (nnUNetv2_ssl_train_quality) to score each pseudo-label")
    vox = p.add_argument_group("voxel selection (ignored voxels get the dataset's ignore label)")
    vox.add_argument("--ignore-below", type=float, default=0.0, metavar="P",
                     help="ignore voxels whose ensemble max-probability is below P (default 0: none)")
    vox.add_argument("--ignore-disagreement", action="store_true", help="ignore voxels where the sources disagree")
    run = p.add_argument_group("running")
    run.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    run.add_argument("--part-id", type=int, default=0, help="this shard (as nnUNetv2_predict's -part_id)")
    run.add_argument("--num-parts", type=int, default=1,
                     help="shards of the pool; run each part, then once without --part-id to write the dataset")
    run.add_argument("-npp", type=int, default=2, help="preprocessing processes (default 2)")
    run.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    run.add_argument("--disable_tta", action="store_true", help="no mirroring at prediction")
    run.add_argument("--no-probabilities", action="store_true", help="do not keep the ensemble's probabilities")
    run.add_argument("--link-images", action="store_true",
                     help="symlink the images into the new dataset instead of copying them")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier result of this command")
    rounds = p.add_argument_group("rounds (pseudo-label, preprocess, train the student; repeat)")
    rounds.add_argument("--rounds", type=int, default=0, help="run N full rounds (ids -t, -t+1, ...)")
    rounds.add_argument("--student-trainer", default="nnUNetTrainer", help="student trainer (default nnUNetTrainer)")
    rounds.add_argument("--student-fold", type=int, default=0, help="student fold (default 0)")
    rounds.add_argument("--student-init", default="scratch", choices=["scratch", "teacher"],
                        help="student from scratch or from the teacher's weights (default scratch)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> None:
        # torch and nnU-Net load here, so that --help answers at once
        from nnunet_ssl.pseudolabel.pipeline import PseudoLabelSettings, configuration_of, pseudolabel
        from nnunet_ssl.pseudolabel.predict import VoxelRule
        from nnunet_ssl.pseudolabel.selection import SelectionRule
        from nnunet_ssl.uncertainty.predict_uncertainty import model_folder_of, select_device

        if args.models is None and args.c is None:
            raise SSLInputError("give the teacher: -m MODEL_FOLDER ..., or -tr/-p/-c of a model of the source dataset")
        models = args.models or [model_folder_of(args.d, args.tr, args.p, args.c)]
        settings = PseudoLabelSettings(
            dataset=args.d, model_folders=models, work=args.o, target_id=args.t, target_name=args.name,
            folds=args.f, checkpoints=args.chk, split_fold=args.split_fold, unlabeled_folder=args.unlabeled_folder,
            use_images_unlabeled=not args.no_images_unlabeled,
            selection=SelectionRule(args.min_agreement, args.min_stability, args.min_confidence, args.max_uncertainty,
                                    args.min_quality, args.max_ignored, args.top_k, args.top_fraction, args.rank_by),
            voxels=VoxelRule(args.ignore_below, args.ignore_disagreement), quality_predictor=args.quality_predictor,
            keep_probabilities=not args.no_probabilities, link_images=args.link_images, overwrite=args.overwrite,
            step_size=args.step_size, use_mirroring=not args.disable_tta, num_processes=args.npp)
        device = select_device(args.device)
        if args.rounds:
            if args.num_parts != 1:
                raise SSLInputError("--rounds runs every step itself; shard with --num-parts without --rounds")
            from nnunet_ssl.pseudolabel.rounds import run_rounds

            configuration = args.c or configuration_of(models[0])
            if configuration is None:
                raise SSLInputError(f"cannot tell the configuration of {models[0]}; pass -c")
            run_rounds(settings, args.rounds, args.student_trainer, configuration, args.student_fold,
                       args.student_init, args.device)
        else:
            pseudolabel(settings, device, args.part_id, args.num_parts)

    return exit_code_of(command)


if __name__ == "__main__":
    sys.exit(main())
