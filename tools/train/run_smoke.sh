#!/bin/bash
# Device smoke test: environment, QAT training for ~60 s on a fake corpus, export, verify, perplexity.
set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c 'import torch,transformers,tokenizers;print(torch.__version__,transformers.__version__,tokenizers.__version__)'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
cd tools/train
python3 prep_data.py ../../.data/fake.jsonl --out /tmp/fakedata --vocab 600 --n-val 50 || exit 1
python3 train.py --data /tmp/fakedata --out $OUT/smoke --seconds 45 --ckpt /tmp/smoke.pt ${SMOKE_ARGS} || exit 1
python3 verify_export.py --ckpt /tmp/smoke.pt --hf $OUT/smoke/hf --device cuda
python3 eval_ppl.py $OUT/smoke/hf /tmp/fakedata/validation.txt --ctx 512 --device cuda
rm -f $OUT/smoke/hf/model.safetensors
