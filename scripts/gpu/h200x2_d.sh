#!/usr/bin/env bash
# 2 x H200: what issue 12 still owed after h200x2_c.sh (one call, under 10 minutes).
#  1. The TP decode miss from a per-kernel profile: the TP benchmark with --profile (each engine's
#     decode step kernel by kernel: TP=1, TP=2 per all-reduce, compute-only): what halves, what not.
#  2. The DP miss's candidate fix: --no-autotune (no timing-based kernel tuning, so every rank compiles
#     the same kernels): the --dp phases, then one GPU and 2 ranks, each from a cold Inductor cache.
#     Compare with docs/results/scale-out/dp-turns (autotune on: ranks 4.14 / 4.75 ms, 1.84x).
# Needs .carry/data (the real sample and the LLaMA-2 tokenizer). NVLink multicast stays off.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=.carry/data; O=${OUT:-/tmp/out}/x2d; mkdir -p $O
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
timeout 220 $TR benchmarks/scale_out.py --profile 20 --repeats 3 --out $O/tp_profile.json > $O/tp_profile.txt 2>&1; echo "rc=$?" >> $O/tp_profile.txt
TORCHINDUCTOR_CACHE_DIR=/tmp/ic0 timeout 110 $TR benchmarks/scale_out.py --dp --autotune 0 --repeats 5 --out $O/dp_phases_noautotune.json > $O/dp_phases_noautotune.txt 2>&1; echo "rc=$?" >> $O/dp_phases_noautotune.txt
RUN="-m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 32 --warmup 1 --no-ceilings --no-autotune"
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ic1 timeout 90 python3 $RUN --out $O/dp1 > $O/dp1.txt 2>&1; echo "rc=$?" >> $O/dp1.txt
TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 120 $TR $RUN --out $O/dp2 > $O/dp2.txt 2>&1; echo "rc=$?" >> $O/dp2.txt
rm -f $O/dp*/stage_shares.png
cd ${OUT:-/tmp/out} && tar czf x2d.tgz x2d && rm -rf x2d; ls -la
