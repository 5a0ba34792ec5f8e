"""Micro-benchmark of one decode step's attention (grouped queries over a shared prefix and row slots).

Times ``_grouped_attention`` eager, compiled with dynamic shapes and compiled for fixed shapes, at the 8B
model's head layout, and prints microseconds per call. GPU only.

    python bench/decode_attention.py [--batch 128] [--window 448] [--prefix 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moderation.engine.decoder import _grouped_attention


def main() -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--window", type=int, default=448)
    parser.add_argument("--prefix", type=int, default=512)
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    b, heads, kv, d, w, p = args.batch, 32, 8, 128, args.window, args.prefix
    q = torch.randn(b, heads, 1, d, device=dev, dtype=dt)
    rk = torch.randn(b, kv, 1024, d, device=dev, dtype=dt)[:, :, :w]
    rv = torch.randn(b, kv, 1024, d, device=dev, dtype=dt)[:, :, :w]
    pk = torch.randn(kv, p, d, device=dev, dtype=dt)
    pv = torch.randn(kv, p, d, device=dev, dtype=dt)
    bias = torch.zeros(b, 1, 1, p + w, device=dev)
    variants = {
        "eager": _grouped_attention,
        "compiled, dynamic": torch.compile(_grouped_attention, dynamic=True),
        "compiled, static": torch.compile(_grouped_attention, dynamic=False),
    }
    reference = _grouped_attention(q, rk, rv, pk, pv, bias, d**-0.5)
    print(f"batch {b}, window {w}, prefix {p}")
    for name, fn in variants.items():
        started = time.perf_counter()
        out = fn(q, rk, rv, pk, pv, bias, d**-0.5)
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(q, rk, rv, pk, pv, bias, d**-0.5)
        graph.replay()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(200):
            graph.replay()
        torch.cuda.synchronize()
        per_call = (time.perf_counter() - started) / 200 * 1e6
        error = (out.float() - reference.float()).abs().max().item()
        print(f"{name:20} {per_call:8.1f} us/call  first call {first:6.1f} s  max |diff| {error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
