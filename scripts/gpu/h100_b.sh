#!/usr/bin/env bash
# H100, call B: speculative decoding (issue 10): GPU tests, then benchmarks/speculative.py.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=.carry/data; O=${OUT:-/tmp/out}/b; mkdir -p $O
export STAGEWISE_SHARED_DATA=$PWD/.carry/shared
mkdir -p .carry/shared/events .carry/shared/tokenizers/llama2
cp $D/eventgpt_sample1.npy .carry/shared/events/; cp $D/tokenizer.model .carry/shared/tokenizers/llama2/
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_speculative.py > $O/gpu_tests.txt 2>&1; echo "rc=$?" >> $O/gpu_tests.txt
timeout 420 python3 -m benchmarks.speculative --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --out $O/speculative_h100.json > $O/speculative_h100.txt 2>&1; echo "rc=$?" >> $O/speculative_h100.txt
cd ${OUT:-/tmp/out} && tar czf b.tgz b && rm -rf b; ls -la
