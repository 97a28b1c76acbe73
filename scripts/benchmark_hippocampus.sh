#!/usr/bin/env bash
# The Hippocampus label-budget benchmark of docs/results/hippocampus (issue #6). Resumable: rerun to continue.
#   bash scripts/benchmark_hippocampus.sh [TRAINER ...]     (default: the training-noise control, Mean Teacher,
#   then every other SSL trainer)
# Work folder: $BENCH_DIR (default ../bench beside the repository). Takes many hours on a 2-core CPU; the records and
# the report in docs/results/hippocampus are refreshed after every finished run.
set -uo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
BENCH="${BENCH_DIR:-$REPO_ROOT/../bench}"
SOURCE="${HIPPOCAMPUS_RAW:-$REPO_ROOT/../shared/data/Dataset004_Hippocampus}"
mkdir -p "$BENCH/raw" "$BENCH/preprocessed" "$BENCH/results"
export nnUNet_raw="$BENCH/raw" nnUNet_preprocessed="$BENCH/preprocessed" nnUNet_results="$BENCH/results"
export nnUNet_def_n_proc=2 nnUNet_compile=f OMP_WAIT_POLICY=PASSIVE
if [ ! -d "$BENCH/raw/Dataset004_Hippocampus" ]; then
    cp -r "$SOURCE" "$BENCH/raw/" || exit 1
fi
if [ ! -f "$BENCH/preprocessed/Dataset004_Hippocampus/nnUNetPlans.json" ]; then
    # the planner breaks with nnUNet_n_proc_DA=0
    (unset nnUNet_n_proc_DA; nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np 2 -npfp 2) || exit 1
fi
nnUNetv2_ssl_cpu_plans -d 4 || exit 1   # batch 2, features 16-32-64-128
if [ "$#" -eq 0 ]; then
    set -- nnUNetTrainerSupervisedReseeded nnUNetTrainerMeanTeacher $(nnUNetv2_ssl_trainers \
        | awk '/^nnUNetTrainer/ {print $1}' | grep -v -x -e nnUNetTrainerSupervised -e nnUNetTrainerMeanTeacher \
        -e nnUNetTrainerMEDLNet2 -e nnUNetTrainerSupervisedReseeded)
fi
# the records (per-case metrics and training logs of finished runs, and the report) live in the repository, so a
# new machine continues the matrix from them; commit docs/results/hippocampus after each invocation
nnUNet_n_proc_DA=0 nnUNetv2_ssl_benchmark -d 4 -c 3d_fullres -p nnUNetPlans_CPU -o "$BENCH/hippo" \
    --records "$REPO_ROOT/docs/results/hippocampus" \
    -tr "$@" --budgets 3 10 --seeds 0 1 --full --epochs 20 --iterations-per-epoch 100 -device cpu
