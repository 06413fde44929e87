#!/bin/bash
# Issue 16's UCSD COVID-CT experiment, as it was run (2 CPU cores, no GPU).
# Usage: bash reports/ucsd-ct-dev-ssl/run.sh ../shared/data /tmp/ucsd   (data root, work folder)
set -euo pipefail
DATA=${1:-../shared/data}; WORK=${2:-/tmp/ucsd}
HERE=$(cd "$(dirname "$0")" && pwd)
python "$HERE/make_csv.py" "$DATA" "$WORK"
NEW=(-p DATASET "$WORK/ucsd_dev.csv" -p XRAY_DATASET None -p RUN_ABLATION False -p IMG_SIZE 96
     -p TTA_VIEWS 8 -p EXTERNAL_DATASET "$WORK/mosmed_external.csv")
# The first five variants ran when the defaults were LEARNING_RATE 0.001 and ENHANCEMENT
# crop+wb+clahe; they are named here so that the commands give the same runs at later commits.
COMMON=("${NEW[@]}" -p LEARNING_RATE 0.001 -p ENHANCEMENT crop+wb+clahe)
# scratch and lungcrop were run before zero-initialised residual branches became the from-scratch
# default (3ecd269); at that commit and later the scratch command gives the scratch_zeroinit row
# (DenseNet121 has no residual branches: identical in both). The pretrain rows load pretrained
# weights, which are never zero-initialised, so 3ecd269 does not change them.
python -m covidlib run --quiet "${COMMON[@]}" -p EPOCHS 10 -p RUN_DIR "$WORK/scratch"
python -m covidlib run --quiet "${COMMON[@]}" -p EPOCHS 10 -p RUN_DIR "$WORK/scratch_zeroinit"
python -m covidlib run --quiet "${COMMON[@]}" -p EPOCHS 10 -p ENHANCEMENT lungcrop+wb+clahe \
    -p RUN_DIR "$WORK/lungcrop"
python -m covidlib run --quiet "${COMMON[@]}" -p PRETRAIN_EPOCHS 20 -p EPOCHS 5 -p FINE_TUNE_EPOCHS 5 \
    -p FINE_TUNE_LR 0.0001 -p RUN_DIR "$WORK/pretrain"
python -m covidlib run --quiet "${COMMON[@]}" -p PRETRAIN_EPOCHS 20 -p EPOCHS 5 -p FINE_TUNE_EPOCHS 5 \
    -p FINE_TUNE_LR 0.0001 -p ENHANCEMENT lungcrop+wb+clahe -p RUN_DIR "$WORK/pretrain_lungcrop"
# The learning-rate and enhancement rows (at ac88175; the second is today's defaults).
python -m covidlib run --quiet "${NEW[@]}" -p EPOCHS 10 -p LEARNING_RATE 0.003 -p ENHANCEMENT crop+wb+clahe \
    -p RUN_DIR "$WORK/scratch_lr3e-3"
python -m covidlib run --quiet "${NEW[@]}" -p EPOCHS 10 -p LEARNING_RATE 0.003 -p ENHANCEMENT crop+wb \
    -p RUN_DIR "$WORK/scratch_cropwb_lr3e-3"
# The lung crop and pretraining again, at today's defaults (learning rate 3e-3, crop+wb; at 9ccc826),
# and the defaults with a second training seed.
python -m covidlib run --quiet "${NEW[@]}" -p EPOCHS 10 -p ENHANCEMENT lungcrop+wb -p RUN_DIR "$WORK/lungcropwb_lr3e-3"
python -m covidlib run --quiet "${NEW[@]}" -p PRETRAIN_EPOCHS 20 -p EPOCHS 5 -p FINE_TUNE_EPOCHS 5 \
    -p FINE_TUNE_LR 0.0001 -p RUN_DIR "$WORK/pretrain_cropwb_lr3e-3"
python -m covidlib run --quiet "${NEW[@]}" -p EPOCHS 10 -p SEED 1 -p RUN_DIR "$WORK/scratch_cropwb_lr3e-3_seed1"
VARIANTS=(scratch scratch_zeroinit lungcrop pretrain pretrain_lungcrop scratch_lr3e-3 scratch_cropwb_lr3e-3
          lungcropwb_lr3e-3 pretrain_cropwb_lr3e-3 scratch_cropwb_lr3e-3_seed1)
python "$HERE/table.py" "$WORK" "${VARIANTS[@]}" > "$HERE/table.md"
python "$HERE/lung_share.py" "$WORK" "${VARIANTS[@]}" > "$HERE/lung_share.md"
