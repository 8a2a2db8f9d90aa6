#!/bin/bash
# Device: reassemble the SmolLM2 GGUF (carried in two parts, .gg1 then .gg2), generate stories for
# GEN_SECONDS, then split/tokenizer/tokenize (prep_data.py). Data stays in /tmp/bn on the machine;
# the stories (xz) and the tokenizer come back through $OUT.
set -x -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/smol /tmp/bn
cat .gg1/part .gg2/part > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gg2/sha)  /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
cd tools/train
python3 gen_stories.py --gguf-dir /tmp/smol --out /tmp/bn/stories.jsonl --seconds ${GEN_SECONDS:-400} \
  --batch ${GEN_BATCH:-0} --max-new 400 --seed ${GEN_SEED:-1234} 2>&1 | grep -v "it/s\]" | tee $OUT/gen.log
for f in ../../.data/*.jsonl.xz; do xz -dc $f >> /tmp/bn/stories.jsonl; done; python3 prep_data.py /tmp/bn/stories.jsonl --out /tmp/bn/data --vocab 4096 --n-val 300 2>&1 | tee $OUT/prep.log
xz -T16 -6 -k -c /tmp/bn/stories.jsonl > $OUT/stories.jsonl.xz  # all stories, earlier runs included
tar -C /tmp/bn/data -cf $OUT/data_small.tar tokenizer.json tokenizer_config.json special_tokens_map.json validation.txt stats.json
ls -la $OUT /tmp/bn/data
