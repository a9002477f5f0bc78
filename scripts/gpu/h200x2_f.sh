#!/usr/bin/env bash
# 2 x H200, one call: h200x2_e.sh again with the dense GEMV's per-shape launch configs
# (DENSE_GEMV_CONFIGS, from e's sweep) instead of its a-priori default; and, in the same lease, the
# single-GPU run with the default Inductor reductions tuned by timing, for comparison.
# Needs .carry/data. NVLink multicast stays off.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=.carry/data; O=${OUT:-/tmp/out}/x2f; mkdir -p $O
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
timeout 120 $TR benchmarks/scale_out.py --matvec-kernel triton --autotune 0 --repeats 3 --out $O/tp_triton.json > $O/tp_triton.txt 2>&1; echo "rc=$?" >> $O/tp_triton.txt
RUN="-m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 32 --warmup 1 --no-ceilings"
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ic1 timeout 70 python3 $RUN --no-autotune --matvec-kernel triton --out $O/dp1 > $O/dp1.txt 2>&1; echo "rc=$?" >> $O/dp1.txt
TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 90 $TR $RUN --no-autotune --matvec-kernel triton --out $O/dp2 > $O/dp2.txt 2>&1; echo "rc=$?" >> $O/dp2.txt
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ic3 timeout 80 python3 $RUN --out $O/dp1-inductor > $O/dp1-inductor.txt 2>&1; echo "rc=$?" >> $O/dp1-inductor.txt
rm -f $O/dp*/stage_shares.png $O/dp*/status.rank*.json $O/*/samples.jsonl.lock
cd ${OUT:-/tmp/out} && tar czf x2f.tgz x2f && rm -rf x2f; ls -la
