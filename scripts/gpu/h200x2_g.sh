#!/usr/bin/env bash
# 2 x H200, one short call: a per-kernel profile of the 641-token prefill at TP=1, TP=2 and
# compute-only (the TP prefill miss of h200x2_f.sh), fixed kernels as in h200x2_f.sh.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-/tmp/out}/x2g; mkdir -p $O
timeout 110 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scale_out.py --matvec-kernel triton --autotune 0 --repeats 2 --profile-prefill 3 --out $O/tp_prefill_profile.json > $O/tp_prefill_profile.txt 2>&1; echo "rc=$?" >> $O/tp_prefill_profile.txt
cd ${OUT:-/tmp/out} && tar czf x2g.tgz x2g && rm -rf x2g; ls -la
