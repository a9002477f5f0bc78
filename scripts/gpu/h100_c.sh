#!/usr/bin/env bash
# H100, call C: quantization (issue 11): GPU tests of the kernels, then benchmarks/quantization.py
# (kernels chosen by measurement, engines side by side with bf16).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=.carry/data; O=${OUT:-/tmp/out}/c; mkdir -p $O
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quant.py > $O/gpu_tests.txt 2>&1; echo "rc=$?" >> $O/gpu_tests.txt
timeout 420 python3 benchmarks/quantization.py --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --out $O/quantization_h100.json > $O/quantization_h100.txt 2>&1; echo "rc=$?" >> $O/quantization_h100.txt
cd ${OUT:-/tmp/out} && tar czf c.tgz c && rm -rf c; ls -la
