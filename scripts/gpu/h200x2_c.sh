#!/usr/bin/env bash
# 2 x H200 (issues 12 and 7), after h200x2_b.sh found one rank's tuned kernels 11 % slower than the
# other's: the single-GPU run and the 2-rank DP run in ONE lease (with the warm-up in turns that
# `stagewise run` had at commit 1a8a2e3, reverted after this run showed it did not help; the same is
# `scale_out.py --dp --warmup-in-turns` since), the --dp phases again with the warm-up in turns, each
# from a cold Inductor cache; then the
# GPU sampling test and the 7B determinism rows with their decode-step cost (FastOptions.deterministic).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=.carry/data; O=${OUT:-/tmp/out}/x2c; mkdir -p $O
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu
(nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -lms 200 || nvidia-smi --query-gpu=$Q --format=csv -lms 200) > $O/smi.csv 2>&1 &
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
RUN="-m stagewise run --preset eventgpt-7b --events $D/eventgpt_sample1.npy --tokenizer $D/tokenizer.model --engine fast --fast-stages --repeats 32 --warmup 1 --no-ceilings"
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/ic1 timeout 100 python3 $RUN --out $O/dp1 > $O/dp1.txt 2>&1; echo "rc=$?" >> $O/dp1.txt
TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 130 $TR $RUN --out $O/dp2 > $O/dp2.txt 2>&1; echo "rc=$?" >> $O/dp2.txt
TORCHINDUCTOR_CACHE_DIR=/tmp/ic3 timeout 130 $TR benchmarks/scale_out.py --dp --warmup-in-turns --repeats 5 --out $O/dp_phases.json > $O/dp_phases.txt 2>&1; echo "rc=$?" >> $O/dp_phases.txt
CUDA_VISIBLE_DEVICES=0 timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py -k cuda > $O/gpu_test_sampling.txt 2>&1; echo "rc=$?" >> $O/gpu_test_sampling.txt
CUDA_VISIBLE_DEVICES=0 timeout 165 python3 benchmarks/determinism.py --7b --modes sampling,greedy > $O/determinism_7b_h200.txt 2>&1; echo "rc=$?" >> $O/determinism_7b_h200.txt
pkill -f 'nvidia-smi --query-gpu' || true
rm -f $O/dp*/stage_shares.png
cd ${OUT:-/tmp/out} && tar czf x2c.tgz x2c && rm -rf x2c; ls -la
