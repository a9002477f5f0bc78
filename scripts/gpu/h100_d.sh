#!/usr/bin/env bash
# H100, call D: run-to-run reproducibility of greedy and seeded decoding (engine variants), then the
# fp8 row of the quantization benchmark again (its _scaled_mm prefill now skips the 32001-row LM head).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=.carry/data; O=${OUT:-/tmp/out}/d; mkdir -p $O
timeout 150 python3 benchmarks/determinism.py > $O/determinism_h100.txt 2>&1; echo "rc=$?" >> $O/determinism_h100.txt
timeout 190 python3 benchmarks/quantization.py --kinds fp8 --batch 1 --repeats 3 --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --out $O/quantization_fp8_h100.json > $O/quantization_fp8_h100.txt 2>&1; echo "rc=$?" >> $O/quantization_fp8_h100.txt
cd ${OUT:-/tmp/out} && tar czf d.tgz d && rm -rf d; ls -la
