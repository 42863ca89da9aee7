"""A tiny trainer of your own on top of moecore (no pretrain_gpt.py): build a MoE GPT, train it
on a repeating token pattern for a few steps, and print the loss and the MoE statistics.

    python examples/minimal_trainer.py            # CPU, one process
    torchrun --nproc_per_node 2 examples/minimal_trainer.py --ep 2
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from moecore import parallel_state
from moecore.config import TransformerConfig
from moecore.models import GPTModel
from moecore.moe.losses import MoELossTracker
from moecore.optimizer import finalize_model_grads
from moecore.tensor_parallel.random import model_parallel_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    ps = parallel_state.initialize_model_parallel(expert_model_parallel_size=args.ep)
    model_parallel_seed(1234)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            ffn_hidden_size=128, num_moe_experts=4, moe_router_topk=2,
                            moe_ffn_hidden_size=64, moe_grouped_gemm=True,
                            moe_aux_loss_coeff=1e-2, moe_token_dispatcher_type="alltoall",
                            expert_model_parallel_size=args.ep, vocab_size=32)
    model = GPTModel(cfg, vocab_size=32, max_sequence_length=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Each data-parallel rank sees its own (shifted) copy of a repeating pattern.
    base = torch.arange(33) % 7 + 3 * ps.dp_rank
    tokens, labels = base[:-1].repeat(8, 1), base[1:].repeat(8, 1)
    for step in range(args.steps):
        opt.zero_grad()
        loss = model(tokens, labels=labels).mean()  # per-token loss [B, S] -> mean
        loss.backward()  # router aux losses reach the router through autograd hooks
        finalize_model_grads(model, ps)  # DP / expert-DP gradient all-reduce
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            aux = MoELossTracker.values().get("load_balancing_loss")
            aux_txt = f" | load_balancing_loss {aux.mean():.3f}" if aux is not None else ""
            if ps.rank == 0:
                print(f"step {step:3d} | lm loss {loss.item():.4f}{aux_txt}")
        MoELossTracker.clear()
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main()
