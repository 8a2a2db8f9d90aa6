#!/bin/bash
# Device: QAT training (TRAIN_SECONDS), export of the best-validation checkpoint to the HF packed
# format, check against transformers, perplexity and samples. Uses /tmp/bn/data from run_gen.sh if
# this machine still has it, else rebuilds it from the carried .data/*.jsonl.xz (prep is seeded).
set -x -o pipefail
export PYTHONUNBUFFERED=1
cd tools/train
if [ ! -f /tmp/bn/data/train.bin ]; then
  mkdir -p /tmp/bn && for f in ../../.data/*.jsonl.xz; do xz -dc $f; done > /tmp/bn/all.jsonl
  python3 prep_data.py /tmp/bn/all.jsonl --out /tmp/bn/data --vocab 4096 --n-val 300 || exit 1
fi
cat /tmp/bn/data/stats.json
mkdir -p $OUT/run; python3 train.py --data /tmp/bn/data --out $OUT/run --seconds ${TRAIN_SECONDS:-240} --ckpt /tmp/bn/ckpt.pt $TRAIN_ARGS 2>&1 | tee $OUT/run/train.log || exit 1
python3 verify_export.py --ckpt /tmp/bn/ckpt.pt --hf $OUT/run/hf --device cuda 2>&1 | grep -v Warn
python3 eval_ppl.py $OUT/run/hf /tmp/bn/data/validation.txt --ctx 512 --device cuda 2>&1 | tail -2
python3 sample.py $OUT/run/hf --device cuda 2>&1 | grep -v "^\[transformers\]" | tee $OUT/run/samples.txt
# at most 8 files come back: the weights plus one tar of everything else
cd $OUT/run && mv hf/model.safetensors $OUT/ && tar cf $OUT/run.tar . && cd $OUT && rm -rf $OUT/run && ls -la $OUT
