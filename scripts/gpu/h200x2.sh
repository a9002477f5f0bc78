#!/usr/bin/env bash
# 2 x H200 (issue 12): the tensor-parallel benchmark (its own correctness checks included), then data parallel (1 GPU vs 2 GPUs, 64 samples).
# NVLink multicast stays off (device KINDS.md).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=.carry/data; O=${OUT:-/tmp/out}/x2; mkdir -p $O
nvidia-smi topo -m > $O/topo.txt 2>&1
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
timeout 200 $TR benchmarks/scale_out.py --out $O/tp_h200x2.json > $O/tp_h200x2.txt 2>&1; echo "rc=$?" >> $O/tp_h200x2.txt
RUN="-m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 64 --warmup 1 --no-ceilings"
timeout 140 python3 $RUN --out $O/dp1 > $O/dp1.txt 2>&1; echo "rc=$?" >> $O/dp1.txt
timeout 140 $TR $RUN --out $O/dp2 > $O/dp2.txt 2>&1; echo "rc=$?" >> $O/dp2.txt
rm -f $O/dp*/stage_shares.png
cd ${OUT:-/tmp/out} && tar czf x2.tgz x2 && rm -rf x2; ls -la
