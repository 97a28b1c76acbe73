#!/usr/bin/env bash
# The validation-only sweep of issue #33 on the Hippocampus benchmark's 3-label, seed-0 workspace: each trainer's
# default preset against its paper preset (and the settings named below), scored by nnU-Net's final validation Dice
# of the fold's 42 validation cases. The test cases are never predicted. Resumable: rerun to continue.
#   bash scripts/sweep_hippocampus.sh [TRAINER ...]      (default: every trainer below, one after the other)
# Needs the benchmark's baseline at 3 labels, seed 0 (scripts/benchmark_hippocampus.sh, work folder $BENCH_DIR/hippo;
# SWEEP_BENCHMARK names another benchmark folder, e.g. one run for seed 0 alone).
# Records (sweep.json, sweep.md, per-run training logs) are copied to docs/results/hippocampus_sweep/<trainer>/.
set -uo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
BENCH="${BENCH_DIR:-$REPO_ROOT/../bench}"
export nnUNet_raw="$BENCH/raw" nnUNet_preprocessed="$BENCH/preprocessed" nnUNet_results="$BENCH/results"
export nnUNet_def_n_proc=2 nnUNet_compile=f OMP_WAIT_POLICY=PASSIVE nnUNet_n_proc_DA=0 OMP_NUM_THREADS=1
RECORDS="$REPO_ROOT/docs/results/hippocampus_sweep"
declare -A GRID=(
    [nnUNetTrainerMeanTeacher]="preset=default,paper"
    [nnUNetTrainerFixMatch]="preset=default,paper"
    [nnUNetTrainerFixMatchMetaSSL]="preset=default,paper"
    [nnUNetTrainerCPS]="preset=default,paper"
    [nnUNetTrainerMEDL]="preset=default,paper"
    [nnUNetTrainerMeanTeacherMetaSSL]="preset=default,paper"
)
[ "$#" -eq 0 ] && set -- nnUNetTrainerMeanTeacher nnUNetTrainerFixMatch nnUNetTrainerFixMatchMetaSSL \
    nnUNetTrainerCPS nnUNetTrainerMEDL nnUNetTrainerMeanTeacherMetaSSL
for tr in "$@"; do
    # shellcheck disable=SC2086
    nnUNetv2_ssl_sweep -b "${SWEEP_BENCHMARK:-$BENCH/hippo}" --budget 3 --seed 0 -tr "$tr" --grid ${GRID[$tr]:-} \
        -o "$BENCH/sweep/$tr" -device cpu || exit 1
    mkdir -p "$RECORDS/$tr"
    cp "$BENCH/sweep/$tr/sweep.json" "$BENCH/sweep/$tr/sweep.md" "$RECORDS/$tr/"
    cp -r "$BENCH/sweep/$tr/runs" "$RECORDS/$tr/"
done
