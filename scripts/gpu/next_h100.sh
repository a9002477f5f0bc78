#!/usr/bin/env bash
# H100, NOT YET RUN (the session's device time was spent): the checks this session's changes still
# owe a GPU. Each writes under $OUT/next; commit the outputs under docs/results/ with their notes.
#  1. seeded sampling reproducible at 7B with FastOptions.deterministic (default on when sampling),
#     its cost on the decode step (deterministic=True vs False rows), and the GPU sampling tests;
#  2. the speculative benchmark again: e2e with the fast stages actually applied (commit 423e0a0)
#     and section (e), prompt lookup vs plain greedy ids with the near-tie margins; its GPU tests
#     with a limit that covers compilation on a cold machine.
# The timeouts add up past one device call (600 s): run it as two calls, or set STEPS.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=.carry/data; O=${OUT:-/tmp/out}/next; mkdir -p $O
STEPS=${STEPS:-"12 34"}  # "12": determinism + sampling tests; "34": speculative benchmark + tests
if [[ $STEPS == *12* ]]; then
timeout 360 python3 benchmarks/determinism.py --7b --modes sampling,greedy > $O/determinism_7b_h100.txt 2>&1; echo "rc=$?" >> $O/determinism_7b_h100.txt
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sampling.py > $O/gpu_tests_sampling.txt 2>&1; echo "rc=$?" >> $O/gpu_tests_sampling.txt
fi
if [[ $STEPS == *34* ]]; then
timeout 400 python3 -m benchmarks.speculative --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --extend-matvec-ks "" --out $O/speculative_h100.json > $O/speculative_h100.txt 2>&1; echo "rc=$?" >> $O/speculative_h100.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_speculative.py > $O/gpu_tests_speculative.txt 2>&1; echo "rc=$?" >> $O/gpu_tests_speculative.txt
fi
cd ${OUT:-/tmp/out} && tar czf next.tgz next && rm -rf next; ls -la
