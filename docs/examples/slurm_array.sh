#!/bin/bash
# One subject per array task, all writing into one output folder (safe: unimo-bids writes
# dataset-level files atomically). Submit with, e.g., 20 subjects:
#   sbatch --array=1-20 slurm_array.sh
#SBATCH --job-name=unimo-bids
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --output=logs/unimo-bids_%A_%a.out
# For the CUDA image, also: #SBATCH --gres=gpu:1 (and add --nv below)
set -euo pipefail

BIDS_DIR=/project/mystudy/bids
OUT_DIR=/project/mystudy/derivatives/unimo-bids
WORK_ROOT=/scratch/$USER/unimo-work
IMAGE=/project/containers/unimo-bids.sif

# The subject of this task: line N of participants.tsv (after its header).
subject=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$BIDS_DIR/participants.tsv" | cut -f1)
mkdir -p "$OUT_DIR" "$WORK_ROOT/$subject"

apptainer run --cleanenv \
    -B "$BIDS_DIR":/data:ro -B "$OUT_DIR":/out -B "$WORK_ROOT/$subject":/work \
    "$IMAGE" /data /out participant \
    --participant-label "${subject#sub-}" -w /work \
    --nprocs "$SLURM_CPUS_PER_TASK" --mem "${SLURM_MEM_PER_NODE}MB" \
    --random-seed 42 --skip-bids-validation
