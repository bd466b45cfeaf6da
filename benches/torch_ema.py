#!/usr/bin/env python3
"""Time a weight EMA in PyTorch, for comparison with a Rust/wgpu EMA crate.

The update is  shadow = decay * shadow + (1 - decay) * param  on f32 tensors,
which moves 12 bytes per element (read param, read shadow, write shadow).

Usage: python3 torch_ema.py --shapes SHAPES.json --csv OUT.csv [--quick]
SHAPES.json maps a model name to a list of tensor shapes, e.g.
    {"resnet50": [[64, 3, 7, 7], [64]], "gpt2_small": [[50257, 768]]}
"""
import argparse
import csv
import inspect
import json
import math
import sys
import time

import torch

DECAY = 0.9999
W = 1.0 - DECAY                   # lerp weight: shadow += W * (param - shadow)
FLAT_LOG2 = [20, 22, 24, 26, 28]  # flat single-tensor sizes, in elements
WARMUP = 5


def time_loop(fn, iters):
    """Warm up, then time `iters` calls of fn(step). Returns (gpu ms/step, host us/step)."""
    for k in range(WARMUP):
        fn(k)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for k in range(iters):
        fn(WARMUP + k)
    end.record()
    torch.cuda.synchronize()      # host time includes draining the queue
    host_us = (time.perf_counter() - t0) * 1e6 / iters
    return start.elapsed_time(end) / iters, host_us


def randn(shape):
    return torch.randn(shape, device="cuda", dtype=torch.float32)


def free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class Rows:
    """Collects result rows, prints each one, writes the CSV at the end."""
    HEADER = ["source", "workload", "elements", "tensors", "ms_per_step", "gb_per_s", "host_us_per_step"]

    def __init__(self):
        self.rows = []
        print(f"{'workload':<34}{'elements':>12}{'tensors':>9}{'ms/step GPU':>13}{'GB/s':>9}{'host us/step':>14}")

    def add(self, workload, elements, tensors, ms, host_us, bytes_per_elem=12):
        gbps = elements * bytes_per_elem / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")
        self.rows.append(["torch", workload, elements, tensors, f"{ms:.6f}", f"{gbps:.2f}", f"{host_us:.2f}"])
        print(f"{workload:<34}{elements:>12}{tensors:>9}{ms:>13.4f}{gbps:>9.1f}{host_us:>14.1f}", flush=True)

    def write(self, path):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.HEADER)
            w.writerows(self.rows)


def bench_flat(rows, iters):
    """One tensor of 2^k elements: foreach lerp, plain lerp, add_ reference, copy."""
    for p in FLAT_LOG2:
        n = 1 << p
        it = max(3, iters // 5) if p >= 28 else iters   # 2^28 = 1 GiB per tensor: fewer iterations
        shadow, param = randn(n), randn(n)
        ms, hu = time_loop(lambda k: torch._foreach_lerp_([shadow], [param], W), it)
        rows.add(f"flat_2^{p}_foreach_lerp", n, 1, ms, hu)
        ms, hu = time_loop(lambda k: shadow.lerp_(param, W), it)
        rows.add(f"flat_2^{p}_lerp", n, 1, ms, hu)
        # Bandwidth reference with the same access pattern (2 reads + 1 write).
        ms, hu = time_loop(lambda k: shadow.add_(param, alpha=W), it)
        rows.add(f"flat_2^{p}_add_ref", n, 1, ms, hu)
        # Plain device copy: 1 read + 1 write = 8 B/elem.
        ms, hu = time_loop(lambda k: shadow.copy_(param), it)
        rows.add(f"flat_2^{p}_copy", n, 1, ms, hu, bytes_per_elem=8)
        del shadow, param
        free()


def make_timm_ema(model):
    """Build timm's ModelEmaV3, passing only the keyword arguments this timm version accepts."""
    from timm.utils import ModelEmaV3
    wanted = {"decay": DECAY, "use_warmup": False, "device": None, "foreach": True}
    accepted = inspect.signature(ModelEmaV3.__init__).parameters
    ema = ModelEmaV3(model, **{k: v for k, v in wanted.items() if k in accepted})
    takes_step = "step" in inspect.signature(ema.update).parameters
    return ema, takes_step


def bench_model(rows, name, shapes, iters):
    """A model's tensor list: raw _foreach_lerp_ and timm ModelEmaV3.update."""
    shapes = [tuple(s) for s in shapes]
    elements = sum(math.prod(s) for s in shapes)   # math.prod(()) == 1 for scalars
    shadows = [randn(s) for s in shapes]
    params = [randn(s) for s in shapes]
    ms, hu = time_loop(lambda k: torch._foreach_lerp_(shadows, params, W), iters)
    rows.add(f"{name}_foreach_lerp", elements, len(shapes), ms, hu)
    del shadows

    # timm ModelEmaV3 on a tiny module whose parameters are exactly these tensors.
    try:
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])
        ema, takes_step = make_timm_ema(model)
        fn = (lambda k: ema.update(model, step=k)) if takes_step else (lambda k: ema.update(model))
        ms, hu = time_loop(fn, iters)
        rows.add(f"{name}_timm_ModelEmaV3", elements, len(shapes), ms, hu)
        del ema, model
    except Exception as e:  # timm missing or its API differs: note it and skip the row
        print(f"  note: skipping {name}_timm_ModelEmaV3 ({type(e).__name__}: {e})", flush=True)
    del params
    free()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", required=True, help="JSON file: {model_name: [[shape], ...]}")
    ap.add_argument("--csv", required=True, help="output CSV path")
    ap.add_argument("--quick", action="store_true", help="10 timed iterations instead of 50")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("error: CUDA is not available; this benchmark needs an NVIDIA GPU.", file=sys.stderr)
        sys.exit(2)

    with open(args.shapes) as f:
        models = json.load(f)
    iters = 10 if args.quick else 50

    try:
        import timm
        timm_version = timm.__version__
    except Exception as e:
        timm_version = f"unavailable ({type(e).__name__})"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm_version}")
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"decay={DECAY}, warmup={WARMUP}, timed iterations={iters} (fewer for 2^28)\n")

    torch.manual_seed(0)
    rows = Rows()
    bench_flat(rows, iters)
    for name, shapes in models.items():
        bench_model(rows, name, shapes, iters)
    rows.write(args.csv)
    print(f"\nwrote {len(rows.rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
