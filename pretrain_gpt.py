"""Pretrain a GPT (dense or MoE) model with Megatron-LM's flags.

    python pretrain_gpt.py --num-layers 2 --hidden-size 64 ... --mock-data --vocab-size 256
    torchrun --nproc_per_node 4 pretrain_gpt.py --tensor-model-parallel-size 2 ...

``python pretrain_gpt.py --help`` lists the flags by group.
"""

from moecore.arguments import parse_args
from moecore.training import pretrain


def main(argv: list[str] | None = None) -> dict:
    return pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
