#!/usr/bin/env bash
# The GPU benchmark, for a machine with an NVIDIA GPU, PyTorch and timm, but no Rust toolchain
# and no network. Build the bench binary beforehand where Rust is:
#   cargo bench --bench gpu_bench --no-run
# (it prints the binary's path, target/release/deps/gpu_bench-<hash>) and bring it along with the Vulkan loader's Debian packages (libvulkan1 ...) in `.gl/`
# (see docs/benchmarks.md). Then, from the repository root:
#   benches/gpu.sh [OUT_DIR]
# One run of a few minutes: our update (GPU time from timestamp queries) on 2^16..2^28 f32 and on
# ResNet-50's and GPT-2 small's tensor lists (arena / own buffers / 4 pooled buffers), SGD,
# momentum and AdamW alone / with the EMA pass / with the EMA fused in (2^24 f32), then in
# the same run PyTorch's torch._foreach_lerp_ and timm's ModelEmaV3 over the same lists (CUDA
# events); then the offload bench if its binary is there. Writes OUT_DIR/wgpu.csv,
# OUT_DIR/torch.csv, OUT_DIR/summary.txt and OUT_DIR/offload/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bench}"
# The newest gpu_bench binary cargo built, unless GPU_BENCH_BIN names one.
bin="${GPU_BENCH_BIN:-$(ls -t target/release/deps/gpu_bench-* 2>/dev/null | grep -v '\.d$' | head -n 1)}"
mkdir -p "$out"
if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
"$bin" --max-log2 "${MAX_LOG2:-28}" --out "$out" 2>&1 | tee "$out/wgpu.log"
# The offloaded EMA (PCIe included), when its binary came along (`cargo bench --bench offload
# --no-run`; OFFLOAD_BENCH_BIN names it): GPU memory, throughput against its stages, step cost.
offload_bin="${OFFLOAD_BENCH_BIN:-$(ls -t target/release/deps/offload-* 2>/dev/null | grep -v '\.d$' | head -n 1)}"
if [ -n "$offload_bin" ]; then
  "$offload_bin" --out "$out/offload" 2>&1 | tee "$out/offload.log"
fi
python3 benches/torch_ema.py --shapes "$out/shapes.json" --csv "$out/torch.csv" 2>&1 | tee "$out/torch.log"
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import csv, sys, os
out = sys.argv[1]
rows = {}
for name in ("wgpu.csv", "torch.csv"):
    p = os.path.join(out, name)
    if os.path.exists(p):
        for r in csv.DictReader(open(p)):
            rows[r["workload"]] = float(r["ms_per_step"])
def find(prefix):
    return next((v for k, v in rows.items() if k.startswith(prefix)), None)
for model in ("resnet50", "gpt2_small"):
    t = rows.get(f"{model}_foreach_lerp")
    for how in ("arena", "buffers", "4-buffers"):
        w = find(f"{model}-{how} ")
        if t and w:
            print(f"{model} {how}: {w:.4f} ms vs _foreach_lerp_ {t:.4f} ms: {t / w:.2f}x")
for model in ("resnet50", "gpt2_small"):
    d, s = find(f"{model}-arena "), find(f"{model}-arena-tiling-software ")
    if d and s:
        print(f"{model} arena: default tiling {d:.4f} ms, Tiling::Software {s:.4f} ms")
for name, opt in (("sgd", 12), ("momentum", 20), ("adamw", 28), ("sgd4", 12), ("momentum4", 20), ("adamw4", 28)):
    a, p, f = rows.get(f"opt-{name}"), rows.get(f"opt-{name}+ema-pass"), rows.get(f"opt-{name}-fused")
    if a and p and f:
        print(f"{name}: alone {a:.4f} ms, + EMA pass {p:.4f} ms, fused {f:.4f} ms: {p / f:.2f}x (bytes {opt + 12}/{opt + 8} = {(opt + 12) / (opt + 8):.2f}x)")
for k in (24, 26, 28):
    e, c, a = rows.get(f"flat-2^{k}-ema"), rows.get(f"flat-2^{k}-copy-vec4"), rows.get(f"flat-2^{k}-axpy-vec4")
    if e and c and a:
        # GB/s of each: the EMA and axpy move 12 bytes per element, the copy 8.
        n = 1 << k
        ge, gc, ga = 12 * n / e / 1e6, 8 * n / c / 1e6, 12 * n / a / 1e6
        print(f"2^{k}: EMA {ge:.0f} GB/s = {100 * ge / gc:.0f}% of vec4 copy ({gc:.0f}), {100 * ge / ga:.0f}% of vec4 axpy ({ga:.0f})")
PY
