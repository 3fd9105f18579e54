"""Chunked log-prob + entropy vs the naive log_softmax + gather: peak memory and time, same run.

Each variant runs in its own subprocess, so that its peak memory is its own: on CPU the peak
resident set size (ru_maxrss) above the baseline with the logits already allocated, on CUDA
torch.cuda.max_memory_allocated above the same baseline. Every variant computes the log-probs and
entropy of the sampled tokens, then dL/dlogits with torch.autograd.grad — so the gradient buffer
each variant needs is counted, as a trainer would pay for it.

    python bench/logprobs.py                          # CPU default: 2048 tokens × 151,936 vocab
    python bench/logprobs.py --tokens 8192 --device cuda

Target: chunked peak ≤ 0.25× naive peak at ≤ 1.2× naive time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from icepop.algo import logprobs_and_entropy, logprobs_and_entropy_naive

VARIANTS = ("naive", "chunked", "chunked-inplace")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(variant: str, tokens: int, vocab: int, dtype: str, device: str, repeats: int) -> dict:
    """Run one variant in this process: peak memory of the first step, median time of the rest."""
    g = torch.Generator(device=device).manual_seed(0)
    # Drawn directly in the target dtype: a float32 draw cast down would leave its transient in the peak.
    logits = torch.randn(tokens, vocab, generator=g, device=device, dtype=DTYPES[dtype])
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    upstream = torch.randn(tokens, generator=g, device=device)

    def step() -> None:
        x = logits.detach().requires_grad_(True)
        # A non-leaf like a model's output: inplace backward may then reuse its storage.
        x_out = x.view_as(x)
        if variant == "naive":
            lp, h = logprobs_and_entropy_naive(x_out, labels)
        else:
            lp, h = logprobs_and_entropy(x_out, labels, inplace_backward=variant == "chunked-inplace")
        loss = (lp * upstream).sum() + 0.01 * h.sum()
        (grad,) = torch.autograd.grad(loss, x_out)
        assert grad.shape == logits.shape
        _sync(device)

    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _current_bytes(device)
    step()
    peak = _peak_bytes(device) - baseline
    if variant == "chunked-inplace":  # the step overwrote the logits: restore them for timing
        logits.copy_(torch.randn(tokens, vocab, generator=g, device=device, dtype=DTYPES[dtype]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "dtype": dtype, "peak_bytes": peak, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "variant:dtype" in a subprocess
    args = parser.parse_args()

    if args.one:
        variant, dtype = args.one.split(":")
        print(json.dumps(measure(variant, args.tokens, args.vocab, dtype, args.device, args.repeats)))
        return

    print(
        f"{args.tokens} tokens × {args.vocab} vocab on {args.device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); forward + dL/dlogits; median of {args.repeats}"
    )
    results = []
    for dtype in args.dtypes.split(","):
        rows = {}
        for variant in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                f"{variant}:{dtype}",
                "--tokens",
                str(args.tokens),
                "--vocab",
                str(args.vocab),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        naive = rows["naive"]
        gib = args.tokens * args.vocab * torch.finfo(DTYPES[dtype]).bits // 8 / 2**30
        print(f"\n{dtype} logits ({gib:.2f} GiB)")
        print(f"  {'variant':<16} {'peak MiB':>10} {'× naive':>8} {'seconds':>9} {'× naive':>8}")
        for variant, row in rows.items():
            row["peak_ratio"] = row["peak_bytes"] / naive["peak_bytes"]
            row["time_ratio"] = row["seconds"] / naive["seconds"]
            print(
                f"  {variant:<16} {row['peak_bytes'] / 2**20:>10.0f} {row['peak_ratio']:>8.3f} "
                f"{row['seconds']:>9.3f} {row['time_ratio']:>8.3f}"
            )
            results.append({**row, "tokens": args.tokens, "vocab": args.vocab, "device": args.device})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
