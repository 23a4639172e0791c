"""Where an accelerator step's time goes, from the trace that `bench_train.py --profile` writes:
milliseconds per step of matrix products, attention and everything else (elementwise fusions,
reductions, copies), then the largest kernels.

    python experiments/bench_train.py --preset gpt2-small --batch-size 16 --profile /tmp/prof
    python experiments/profile_summary.py /tmp/prof

Reads the `*.trace.json.gz` under the directory (the newest, if several) with the standard library
alone, so it runs on any machine the trace is copied to.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

# Kernel-name fragments of each kind (cuBLAS, CUTLASS and XLA's Triton GEMMs; cuDNN attention).
KINDS = {
    "matmul": ("nvjet", "gemm", "cutlass", "xmma", "cublas"),
    "attention": ("cudnn", "flash", "sdpa", "fmha"),
    "memset/copy": ("memset", "memcpy"),
}


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, fragments in KINDS.items() if any(f in name for f in fragments)), "other")


def device_kernels(trace: dict) -> list[dict]:
    """The complete events ("X") of the trace's device processes (`/device:GPU:0`, `/device:TPU:0`...)."""
    events = trace["traceEvents"]
    devices = {e["pid"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name" and e["args"]["name"].startswith("/device:")}
    return [e for e in events if e.get("ph") == "X" and e["pid"] in devices]


def newest_trace(directory: Path) -> Path:
    traces = sorted(directory.rglob("*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no *.trace.json.gz under {directory}: run bench_train.py with --profile {directory}")
    return traces[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--steps", type=int, default=3, help="steps the trace holds (bench_train.py traces 3)")
    parser.add_argument("--top", type=int, default=25, help="kernels to list")
    args = parser.parse_args()

    path = newest_trace(args.directory)
    kernels = device_kernels(json.load(gzip.open(path)))
    if not kernels:
        raise SystemExit(f"{path} holds no device kernels (a CPU run traces host threads only)")
    per_kind, per_name, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for event in kernels:
        ms = event.get("dur", 0) / 1000 / args.steps
        per_kind[kind_of(event["name"])] += ms
        per_name[event["name"]] += ms
        calls[event["name"]] += 1
    start = min(e["ts"] for e in kernels)
    span_ms = (max(e["ts"] + e.get("dur", 0) for e in kernels) - start) / 1000 / args.steps
    busy_ms = sum(per_kind.values())
    print(f"{path}: {span_ms:.2f} ms/step from first to last kernel, kernels busy {busy_ms:.2f} ms/step")
    for kind, ms in per_kind.most_common():
        print(f"  {kind:12s} {ms:7.2f} ms/step  {100 * ms / busy_ms:5.1f}%")
    print(f"largest {args.top} kernels (ms/step, launches/step, kind):")
    for name, ms in per_name.most_common(args.top):
        print(f"  {ms:7.3f} {calls[name] / args.steps:5.0f}x  {kind_of(name):11s} {name[:100]}")


if __name__ == "__main__":
    main()
