"""Our CPU fast path against the EMA expressions people write with NumPy, same machine, same run.

    python benches/numpy_ema.py [--quick]

Runs `cargo bench --bench bandwidth -- --cpu-only` for our numbers (its bench.csv), then
times NumPy's in-place expressions on the same sizes, and prints both with the ratio. Needs
numpy (`pip install numpy`).
"""
import csv
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def median_seconds(f, reps):
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    out.sort()
    return out[len(out) // 2]


def main():
    quick = "--quick" in sys.argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(prefix="wgpu-ema-numpy-")
    cmd = ["cargo", "bench", "--quiet", "--bench", "bandwidth", "--", "--cpu-only", "--out", out]
    if quick:
        cmd.append("--quick")
    subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL)
    ours = {}
    with open(os.path.join(out, "bench.csv")) as f:
        for row in csv.DictReader(f):
            if row["path"] == "cpu":
                ours[int(row["elements"])] = float(row["median_ms"])

    d = np.float32(0.999)
    one_minus = np.float32(1.0) - d
    rng = np.random.default_rng(0)
    print(f"{'elements':>10} {'ours ms':>10} {'np: s -= (1-d)*(s-p)':>22} {'ratio':>7} "
          f"{'np: s *= d; s += (1-d)*p':>26} {'ratio':>7}")
    for n in sorted(ours):
        if n < 1 << 14:
            continue
        p = rng.standard_normal(n, dtype=np.float32)
        s = rng.standard_normal(n, dtype=np.float32)
        reps = 5 if quick else 11

        def sub_form():
            s.__isub__(one_minus * (s - p))

        def two_step():
            s.__imul__(d)
            s.__iadd__(one_minus * p)

        t1 = median_seconds(sub_form, reps) * 1e3
        t2 = median_seconds(two_step, reps) * 1e3
        gbs = lambda ms: 12 * n / (ms * 1e-3) / 1e9
        print(f"{n:>10} {ours[n]:>10.4f} {t1:>13.4f} ({gbs(t1):5.1f} GB/s) {t1 / ours[n]:>6.1f}x "
              f"{t2:>15.4f} ({gbs(t2):5.1f} GB/s) {t2 / ours[n]:>6.1f}x")
    print("ratio: NumPy's time / ours (higher is better for us); GB/s counts 12 bytes per element")


if __name__ == "__main__":
    main()
