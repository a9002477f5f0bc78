#!/usr/bin/env bash
# 2 x H200 (issue 12): why data parallel scales below 2x. benchmarks/scale_out.py --dp times the same
# TP=1 decode on each GPU alone and on both at once, with a kernel profile and NVML clocks/power per
# phase; nvidia-smi logs both GPUs every 100 ms throughout (smi.csv). Then the DP run itself again
# (torchrun, 2 ranks, 32 samples) under the same log. NVLink multicast stays off (device KINDS.md).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=.carry/data; O=${OUT:-/tmp/out}/x2b; mkdir -p $O
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE > $O/smi_q.txt 2>&1
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu
(nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -lms 100 || nvidia-smi --query-gpu=$Q --format=csv -lms 100) > $O/smi.csv 2>&1 &
SMI=$!
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
date +%s.%N > $O/times.txt
timeout 220 $TR benchmarks/scale_out.py --dp --repeats 5 --out $O/dp_phases.json > $O/dp_phases.txt 2>&1; echo "rc=$?" >> $O/dp_phases.txt
date +%s.%N >> $O/times.txt
timeout 110 $TR -m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 32 --warmup 1 --no-ceilings --out $O/dp2 > $O/dp2.txt 2>&1; echo "rc=$?" >> $O/dp2.txt
date +%s.%N >> $O/times.txt
kill $SMI; pkill -f 'nvidia-smi --query-gpu' || true
rm -f $O/dp2/stage_shares.png
cd ${OUT:-/tmp/out} && tar czf x2b.tgz x2b && rm -rf x2b; ls -la
