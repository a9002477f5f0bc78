#!/usr/bin/env bash
# H100, call A: GPU tests of the engine/sampling/vision paths, the engine table (issues 4/8) with the
# seeded-sampling check (issue 7), and the issue-2 command with the corrected prompt (issue 7).
# Run from the repository root on the device machine, with .carry/data holding the real sample and
# the LLaMA-2 tokenizer: bash scripts/gpu/h100_a.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=.carry/data; O=${OUT:-/tmp/out}/a; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt 2>&1
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> $O/gpu.txt 2>&1
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_fast.py tests/test_sampling.py tests/test_eventgpt.py tests/test_render.py tests/test_preprocess.py > $O/gpu_tests.txt 2>&1; echo "rc=$?" >> $O/gpu_tests.txt
timeout 260 python3 benchmarks/engine.py --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --out $O/engine_h100.json > $O/engine_h100.txt 2>&1; echo "rc=$?" >> $O/engine_h100.txt
timeout 150 python3 -m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 20 --warmup 3 --out $O/eventgpt-7b-fast > $O/run_fast.txt 2>&1; echo "rc=$?" >> $O/run_fast.txt
cd ${OUT:-/tmp/out} && tar czf a.tgz a && rm -rf a
tail -c 2500 a.tgz >/dev/null; ls -la
