#!/usr/bin/env bash
# H100: what issue 7 still owed after h100_e.sh,
# the README figures still measured at the old 635-token prompt (three models with the fast engine,
# the PNG fairness run, batch 16), re-run at 641 tokens; and the GPU tests of sampling and
# speculative decoding with room for compilation on a cold machine. Two calls: STEPS=A (three models,
# PNG), then STEPS=B (batch 16, GPU tests) on the still-warm machine.
# Needs .carry/ds (stagewise make-dataset ... --simulated 4) and the PyAV wheel in .whl (see
# docs/results/README.md). Outputs under $OUT/f; commit under docs/results/ and update the README's
# "Earlier measurements".
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
D=.carry/data; O=${OUT:-/tmp/out}/f; mkdir -p $O/m-fast $O/m-png
STEPS=${STEPS:-A}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > $O/gpu_$STEPS.txt 2>&1
if [[ $STEPS == A ]]; then
C="--dataset .carry/ds/dataset.json --tokenizer $D/tokenizer.model --repeats 1 --warmup 1 --no-ceilings"
for p in eventgpt-7b:45.5 video-llava-7b:102.4 llava-1.5-7b:102.4; do   # the three models, fast engine
  timeout 120 python3 -m stagewise run --preset ${p%%:*} $C --engine fast --fast-stages --output-len mean:${p##*:} --out $O/m-fast/${p%%:*} > $O/m-fast/${p%%:*}.txt 2>&1; echo "rc=$?" >> $O/m-fast/${p%%:*}.txt
done
python3 -m stagewise compare $O/m-fast/eventgpt-7b $O/m-fast/video-llava-7b $O/m-fast/llava-1.5-7b --out $O/m-fast/compare > $O/m-fast/compare.txt 2>&1
for p in eventgpt-7b:45.5 video-llava-7b:102.4; do   # the fairness switch: both read the same PNG frames
  timeout 80 python3 -m stagewise run --preset ${p%%:*} $C --input-format png --output-len mean:${p##*:} --out $O/m-png/${p%%:*} > $O/m-png/${p%%:*}.txt 2>&1; echo "rc=$?" >> $O/m-png/${p%%:*}.txt
done
python3 -m stagewise compare $O/m-png/eventgpt-7b $O/m-png/video-llava-7b --out $O/m-png/compare > $O/m-png/compare.txt 2>&1
fi
if [[ $STEPS == B ]]; then
B="--preset eventgpt-7b --dataset .carry/ds/dataset.json --tokenizer $D/tokenizer.model --repeats 16 --batch-size 16 --output-len mean:45.5 --no-ceilings"
timeout 120 python3 -m stagewise run $B --engine hf --out $O/b16-hf > $O/b16-hf.txt 2>&1; echo "rc=$?" >> $O/b16-hf.txt   # batch 16, 96 samples
timeout 150 python3 -m stagewise run $B --engine fast --fast-stages --out $O/b16-fast > $O/b16-fast.txt 2>&1; echo "rc=$?" >> $O/b16-fast.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sampling.py tests/test_speculative.py > $O/gpu_tests.txt 2>&1; echo "rc=$?" >> $O/gpu_tests.txt
fi
rm -f $O/*/samples.jsonl.lock $O/*/*/samples.jsonl.lock
cd ${OUT:-/tmp/out} && tar czf f_$STEPS.tgz f && rm -rf f; ls -la
