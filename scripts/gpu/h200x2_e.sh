#!/usr/bin/env bash
# 2 x H200, one call: the fixed-kernel decode path (--matvec-kernel triton: the hand-written dense
# GEMV with launch parameters fixed by the shape) against the Inductor reductions tuned by timing
# that made the TP=1 step and the DP ranks vary per compilation (h200x2_d.sh, issue 12).
#  1. benchmarks/gemv.py: the GEMV's launch-config sweep vs Inductor (tuned / untuned) and cuBLAS on
#     the 7B decode shapes and their TP=2 shards (GPU 0 alone).
#  2. scale_out.py with --matvec-kernel triton --autotune 0 and --profile: TP=1 and TP=2 steps
#     with nothing tuned by timing, kernel by kernel.
#  3. DP: one GPU and 2 ranks with --matvec-kernel triton --no-autotune, cold Inductor caches.
#  4. The GPU tests of the dense GEMV.
# Needs .carry/data. NVLink multicast stays off.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=.carry/data; O=${OUT:-/tmp/out}/x2e; mkdir -p $O
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
date +%s > $O/times.txt
CUDA_VISIBLE_DEVICES=0 timeout 110 python3 benchmarks/gemv.py --out $O/gemv_h200.json > $O/gemv_h200.txt 2>&1; echo "rc=$?" >> $O/gemv_h200.txt; date +%s >> $O/times.txt
timeout 180 $TR benchmarks/scale_out.py --matvec-kernel triton --autotune 0 --profile 20 --repeats 3 --out $O/tp_triton.json > $O/tp_triton.txt 2>&1; echo "rc=$?" >> $O/tp_triton.txt; date +%s >> $O/times.txt
RUN="-m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 32 --warmup 1 --no-ceilings --no-autotune --matvec-kernel triton"
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ic1 timeout 80 python3 $RUN --out $O/dp1 > $O/dp1.txt 2>&1; echo "rc=$?" >> $O/dp1.txt; date +%s >> $O/times.txt
TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 100 $TR $RUN --out $O/dp2 > $O/dp2.txt 2>&1; echo "rc=$?" >> $O/dp2.txt; date +%s >> $O/times.txt
CUDA_VISIBLE_DEVICES=0 timeout 70 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dense_gemv.py > $O/gpu_tests.txt 2>&1; echo "rc=$?" >> $O/gpu_tests.txt
rm -f $O/dp*/stage_shares.png $O/dp*/status.rank*.json $O/*/samples.jsonl.lock
cd ${OUT:-/tmp/out} && tar czf x2e.tgz x2e && rm -rf x2e; ls -la
