#!/usr/bin/env bash
# 2 x H200, NOT YET RUN (this session's device time was spent): issue 12's TP decode miss from a
# per-kernel profile. The TP benchmark again with --profile: each engine's decode step (TP=1, TP=2
# per all-reduce, compute-only) kernel by kernel, i.e. which kernels halve under TP and which do not.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-/tmp/out}/x2d; mkdir -p $O
timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scale_out.py --profile 20 --repeats 3 --out $O/tp_profile.json > $O/tp_profile.txt 2>&1; echo "rc=$?" >> $O/tp_profile.txt
cd ${OUT:-/tmp/out} && tar czf x2d.tgz x2d && rm -rf x2d; ls -la
