"""Where the memory of the e2e model's training step goes (``benchmarks/e2e.py``'s model).

    python benchmarks/e2e_memory.py --micro-batch-size 16
    python benchmarks/e2e_memory.py --micro-batch-size 16 --recompute-granularity selective \
        --recompute-modules moe_act layernorm       # any pretrain_gpt.py flag passes through
    python benchmarks/e2e_memory.py --tiny --device cpu                 # smoke run

Builds the model and optimizer as ``pretrain`` does, runs two eager training micro-batches and
an optimizer step (so every state exists), then reports: memory after building (bf16 weights,
fp32 main weights and gradients), after the step (+ Adam moments), what one micro-batch's
forward keeps for backward (``moecore.memory.saved_activations``, per token and grouped by
shape: ``T`` tokens, ``Tk`` routed rows, ``B`` micro-batch, ``S`` sequence) and the peak of its
backward. One process, no parallelism.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from e2e import COMMON, MODEL, TINY  # noqa: E402

from moecore.arguments import parse_args  # noqa: E402
from moecore.memory import saved_activations  # noqa: E402
from moecore.training import initialize, loop  # noqa: E402

GIB = 2**30


def _symbolic(shape, sizes: dict[int, str]) -> str:
    return "(" + ", ".join(sizes.get(d, str(d)) for d in shape) + ")"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--rows", type=int, default=12)
    args, extra = p.parse_known_args()
    mbs = args.micro_batch_size
    argv = (TINY if args.tiny else MODEL) + COMMON + [
        "--micro-batch-size", str(mbs), "--global-batch-size", str(mbs), "--train-iters", "10"]
    margs = parse_args(argv + ([] if args.tiny else ["--bf16"]) + extra)
    cuda = margs.device == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    initialize.initialize_distributed(margs)
    ps = initialize.initialize_parallel_state_from_args(margs)
    initialize.set_seeds(margs, ps)
    _, model, optimizer, _ = loop._build(margs, ps, None)
    model = model[0] if isinstance(model, list) else model
    params = list(model.parameters())
    print(f"parameters: {sum(p.numel() for p in params) / 1e9:.3f} B; after building: "
          f"{allocated() / GIB:.2f} GiB")

    B, S = mbs, margs.seq_length
    device = torch.device(margs.device)
    tokens = torch.randint(0, margs.padded_vocab_size, (B, S), device=device)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1),
             "position_ids": torch.arange(S, device=device).expand(B, S),
             "loss_mask": torch.ones(B, S, device=device)}

    def micro_batch_loss():
        return loop.masked_mean_loss(loop.model_output(model, batch), batch["loss_mask"])

    for _ in range(2):  # compile kernels, create the gradient buffers
        micro_batch_loss().backward()
    optimizer.step()
    optimizer.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    states = allocated()
    print(f"after an optimizer step (+ Adam moments): {states / GIB:.2f} GiB")
    loss, report = saved_activations(micro_batch_loss, exclude=params)
    T = B * S
    k = margs.moe_router_topk or 1
    print(f"forward keeps {report.total_bytes / GIB:.2f} GiB for backward = "
          f"{report.total_bytes / T / 1024:.1f} KiB per token ({T} tokens)")
    groups = collections.defaultdict(lambda: [0, 0])
    sizes = {T: "T", T * k: "Tk", B: "B", S: "S"} if k > 1 else {T: "T", B: "B", S: "S"}
    for shape, dtype, nbytes in report.shapes:
        key = (_symbolic(shape, sizes), str(dtype).removeprefix("torch."))
        groups[key][0] += 1
        groups[key][1] += nbytes
    for (shape, dtype), (n, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1])[
            :args.rows]:
        print(f"  {shape:28s} {dtype:9s} x{n:4d} {nbytes / GIB:8.3f} GiB "
              f"{nbytes / T / 1024:8.2f} KiB/token")
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(f"peak of this micro-batch: {peak / GIB:.2f} GiB "
              f"({(peak - states) / GIB:.2f} over the states)")


if __name__ == "__main__":
    main()
