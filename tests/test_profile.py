"""stagewise.measure.profile: the kernel classes and the table's arithmetic (CPU: no kernels)."""

import pytest
import torch

from stagewise.measure.profile import format_table, kernel_class, kernel_table


@pytest.mark.parametrize("name,cls", [
    ("_gemv_int4_kernel", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),  # SDPA's memory-efficient kernel, not a GEMM
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused elementwise/reduction (compiled)"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "copy/fill"),
    ("some_kernel", "other"),
])
def test_kernel_class(name, cls):
    assert kernel_class(name) == cls


def test_kernel_table_on_cpu_times_the_steps_and_runs_setup_outside():
    calls = []

    def setup():
        calls.append("setup")
        return torch.ones(64, 64)

    def fn(x):
        calls.append("fn")
        for _ in range(4):
            x = x @ x / 64
        return x

    t = kernel_table(fn, 4, torch.device("cpu"), setup=setup)
    assert calls == ["setup", "fn", "setup", "fn"], "one warm-up call, one profiled call, setup before each"
    assert t["wall_us_per_step"] > 0
    assert t["kernels"] == [] and t["busy_fraction"] is None and t["kernel_us_per_step"] == 0
    assert "no device kernels recorded" in format_table(t, "x")
