"""The master-weight Adam kernel's per-element update on the CPU, against the formulas in float64.

cuda/master_adam.cu keeps `adam_element` __host__ __device__; a host program compiled with nvcc runs
it on random elements (Adam with L2 decay and AdamW with decoupled decay, clipped gradients, early and
late steps, a skipped step). `adam_chunk` runs every chunk of a table of tensors through the kernel's
256 lanes on the CPU (each element updated exactly once, tensors from one element to several chunks,
the clip factor, the skip flag). The launch itself (the table's copy to the device, the grid) is
checked on a GPU by tests/gpu/test_master_adam_cuda.py against pipeline.optim.MasterWeightAdam.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"

# stdin: count, then per element: g master m v lr wd bc1 bc2_sqrt beta1 beta2 eps adam_w;
# stdout per element: master m v
HARNESS = r"""
#include "MASTER_ADAM_CU"
#include <cstdio>

int main() {
    int n;
    if (scanf("%d", &n) != 1) return 1;
    for (int i = 0; i < n; ++i) {
        float g, lr, wd, bc1, bc2_sqrt;
        Element e;
        MasterAdamScalars s;
        if (scanf("%f %f %f %f %f %f %f %f %f %f %f %d", &g, &e.master, &e.exp_avg, &e.exp_avg_sq, &lr, &wd, &bc1,
                  &bc2_sqrt, &s.beta1, &s.beta2, &s.eps, &s.adam_w) != 12)
            return 1;
        e = adam_element(e, g, lr, wd, bc1, bc2_sqrt, s);
        printf("%.9g %.9g %.9g\n", e.master, e.exp_avg, e.exp_avg_sq);
    }
    return 0;
}
"""


# stdin: beta1 beta2 eps adam_w factor skipped, n tensors, then per tensor: numel lr wd step and numel
# lines g master m v; every chunk of the table through every lane, as the kernel's blocks do;
# stdout per element: master m v weight (as float)
TABLE_HARNESS = r"""
#include "MASTER_ADAM_CU"
#include <cstdio>
#include <vector>

int main() {
    MasterAdamScalars s;
    float factor;
    int skipped, n;
    if (scanf("%f %f %f %d %f %d %d", &s.beta1, &s.beta2, &s.eps, &s.adam_w, &factor, &skipped, &n) != 7) return 1;
    std::vector<std::vector<__nv_bfloat16>> grads(n), weights(n);
    std::vector<std::vector<float>> masters(n), ms(n), vs(n);
    std::vector<float> steps(n);
    std::vector<MasterAdamTensor> table(n);
    long long chunks = 0;
    for (int t = 0; t < n; ++t) {
        long long numel;
        float lr, wd;
        if (scanf("%lld %f %f %f", &numel, &lr, &wd, &steps[t]) != 4) return 1;
        grads[t].resize(numel); weights[t].resize(numel);
        masters[t].resize(numel); ms[t].resize(numel); vs[t].resize(numel);
        for (long long i = 0; i < numel; ++i) {
            float g;
            if (scanf("%f %f %f %f", &g, &masters[t][i], &ms[t][i], &vs[t][i]) != 4) return 1;
            grads[t][i] = __float2bfloat16_rn(g);
        }
        table[t] = MasterAdamTensor{grads[t].data(), weights[t].data(), masters[t].data(), ms[t].data(),
                                    vs[t].data(), &steps[t], numel, chunks, lr, wd};
        chunks += master_adam_chunks(numel);
    }
    for (long long chunk = 0; chunk < chunks; ++chunk)
        for (int lane = 0; lane < THREADS; ++lane) adam_chunk(table.data(), n, chunk, lane, s, factor, skipped != 0);
    for (int t = 0; t < n; ++t)
        for (size_t i = 0; i < masters[t].size(); ++i)
            printf("%.9g %.9g %.9g %.9g\n", masters[t][i], ms[t][i], vs[t][i], __bfloat162float(weights[t][i]));
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness(compile_host_program) -> Path:
    return compile_host_program(HARNESS.replace("MASTER_ADAM_CU", str(CUDA_DIR / "master_adam.cu")))


@pytest.fixture(scope="module")
def table_harness(compile_host_program) -> Path:
    return compile_host_program(TABLE_HARNESS.replace("MASTER_ADAM_CU", str(CUDA_DIR / "master_adam.cu")))


def reference(g, master, m, v, lr, wd, step, beta1, beta2, eps, adam_w):
    """torch.optim.Adam (L2) / AdamW (decoupled) for one step, in float64."""
    if adam_w:
        master = master * (1 - lr * wd)
    else:
        g = g + wd * master
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    master = master - lr / bc1 * m / (np.sqrt(v) / np.sqrt(bc2) + eps)
    return master, m, v


@pytest.mark.parametrize("adam_w", [0, 1], ids=["adam-l2", "adamw"])
@pytest.mark.parametrize("step", [1, 2, 1000])
def test_element_update_matches_float64(harness, adam_w, step):
    rng = np.random.default_rng(step * 2 + adam_w)
    n = 2000
    f32 = np.float32
    g = (rng.normal(0, 1e-2, n) * rng.choice([0.0, 1.0, 30.0], n)).astype(f32)  # zeros, typical, clipped-size
    master = rng.normal(0, 0.5, n).astype(f32)
    m = (rng.normal(0, 1e-3, n) if step > 1 else np.zeros(n)).astype(f32)
    v = (rng.random(n) * 1e-5 if step > 1 else np.zeros(n)).astype(f32)
    lr = rng.choice([0.0, 6e-4, 1e-5], n).astype(f32)  # 0: a skipped step
    wd = rng.choice([0.0, 0.1], n).astype(f32)
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    bc1 = f32(1 - f32(beta1) ** step)
    bc2_sqrt = f32(np.sqrt(f32(1 - f32(beta2) ** step)))
    lines = [str(n)] + [
        " ".join(repr(float(x)) for x in (g[i], master[i], m[i], v[i], lr[i], wd[i], bc1, bc2_sqrt))
        + f" {beta1!r} {beta2!r} {eps!r} {adam_w}"
        for i in range(n)
    ]
    out = subprocess.run([str(harness)], input="\n".join(lines), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = np.array([[float(x) for x in line.split()] for line in out.stdout.splitlines()], dtype=np.float32)
    g64, master64, m64, v64, lr64, wd64 = (a.astype(np.float64) for a in (g, master, m, v, lr, wd))
    want = np.stack(reference(g64, master64, m64, v64, lr64, wd64, step, beta1, beta2, eps, adam_w), axis=1)
    # fp32 rounding, bounded by the size of the terms each output is summed from (8 ulps): a wrong sign,
    # bias correction or decay placement is orders of magnitude larger
    ulp = 8 * 2.0**-23
    g_eff = np.abs(g64) + (0 if adam_w else np.abs(wd64 * master64))
    assert (np.abs(got[:, 1] - want[:, 1]) <= ulp * (np.abs(m64) + g_eff) + 1e-30).all(), "exp_avg"
    assert (np.abs(got[:, 2] - want[:, 2]) <= ulp * (v64 + g_eff**2) + 1e-30).all(), "exp_avg_sq"
    update = want[:, 0] - master64
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    denom = np.sqrt(want[:, 2]) / np.sqrt(bc2) + eps
    slack = ulp * np.abs(master64) + 1e-3 * np.abs(update) + lr64 / bc1 * ulp * (np.abs(m64) + g_eff) / denom
    assert (np.abs(got[:, 0] - want[:, 0]) <= slack).all(), "master"
    assert (got[lr == 0, 0] == master[lr == 0]).all(), "a step at lr 0 moved a master weight"


@pytest.mark.parametrize(("adam_w", "skipped"), [(0, 0), (1, 0), (0, 1)], ids=["adam-l2", "adamw", "skipped"])
def test_every_chunk_of_every_tensor_is_updated_once(table_harness, adam_w, skipped):
    """Tensors of 1, 7, 4096 (one chunk), 4097 and 20000 elements with their own lr, decay and step."""
    rng = np.random.default_rng(7 + adam_w + 2 * skipped)
    beta1, beta2, eps, factor = 0.9, 0.99, 1e-8, 0.37
    tensors = []
    for numel, lr, wd, step in [(1, 1e-3, 0.1, 1), (7, 2e-3, 0.0, 3), (4096, 6e-4, 0.1, 10), (4097, 3e-3, 0.0, 2),
                                (20000, 1e-3, 0.1, 100)]:  # fmt: skip
        columns = [rng.normal(0, 1e-2, numel), rng.normal(0, 0.5, numel), rng.normal(0, 1e-3, numel),
                   rng.random(numel) * 1e-5]  # fmt: skip
        tensors.append((numel, lr, wd, step, [c.astype(np.float32) for c in columns]))
    lines = [f"{beta1!r} {beta2!r} {eps!r} {adam_w} {factor!r} {skipped} {len(tensors)}"]
    for numel, lr, wd, step, columns in tensors:
        lines.append(f"{numel} {lr!r} {wd!r} {step}")
        lines += [" ".join(repr(float(c[i])) for c in columns) for i in range(numel)]
    out = subprocess.run([str(table_harness)], input="\n".join(lines), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = np.array([[float(x) for x in line.split()] for line in out.stdout.splitlines()], dtype=np.float32)
    assert len(got) == sum(t[0] for t in tensors)
    row = 0
    for numel, lr, wd, step, (g, master, m, v) in tensors:
        part, row = got[row : row + numel], row + numel
        g_bf16 = torch_bf16(g).astype(np.float64) * np.float64(np.float32(factor))
        g_used = np.zeros(numel) if skipped else g_bf16
        want = np.stack(
            reference(g_used, master.astype(np.float64), m.astype(np.float64), v.astype(np.float64),
                      0.0 if skipped else lr, wd, step, beta1, beta2, eps, adam_w), axis=1,
        )  # fmt: skip
        np.testing.assert_allclose(part[:, :3], want, rtol=1e-4, atol=1e-9)
        assert np.array_equal(part[:, 3], torch_bf16(part[:, 0])), "the weight is its master rounded to bf16"
        if skipped:
            assert np.array_equal(part[:, 0], master), "a skipped step moved a master weight"


def torch_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (nearest even), back as float32."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).bfloat16().float().numpy()
