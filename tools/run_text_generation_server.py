"""Serve a moecore checkpoint over HTTP: Megatron-LM's ``PUT /api`` and OpenAI's
``POST /v1/completions`` (docs/generation.md, "Serving").

    pip install -e ".[serve]"
    python tools/run_text_generation_server.py --load ckpt --use-checkpoint-args \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --port 5000
    torchrun --nproc_per_node 2 tools/run_text_generation_server.py --load ckpt \\
        --use-checkpoint-args --tokenizer-type ... --host 0.0.0.0 --port 5000

The flags listed by ``--help`` belong to the server; all others are pretrain_gpt.py's
(``python pretrain_gpt.py --help``). Under torchrun rank 0 serves HTTP and the other ranks
follow its engine calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

try:
    import moecore  # noqa: F401
except ImportError:  # run from a checkout without pip install -e .
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

try:
    from moecore.inference.server import create_app, serve
except ImportError as _err:  # Flask missing: say so before a checkpoint is loaded
    sys.exit(f"error: {_err}")

from moecore.inference import InferenceEngine, SamplingParams  # noqa: E402
from moecore.inference.loading import parse_generation_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Other flags: pretrain_gpt.py's.",
        allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on; 0.0.0.0 for every interface.")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--served-model-name", default=None,
                   help="Name for OpenAI's 'model' field; default: the --load folder's name.")
    p.add_argument("--server-max-batch-size", type=int, default=128, metavar="N",
                   help="Most sequences in one request and in one batched engine call.")
    p.add_argument("--no-request-batching", action="store_true",
                   help="Give each request its own engine call (no batching of waiting "
                        "requests with equal sampling parameters).")
    return p


def _model_name(server_args: argparse.Namespace, args: argparse.Namespace) -> str:
    if server_args.served_model_name:
        return server_args.served_model_name
    load = getattr(args, "load", None)
    return os.path.basename(os.path.normpath(load)) if load else "moecore"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    server_args, rest = parser.parse_known_args(argv)
    if server_args.server_max_batch_size < 1:
        parser.error("--server-max-batch-size must be >= 1")
    args = parse_generation_args(rest)  # the model's flags; no data flags needed to serve
    engine = InferenceEngine.from_args(args)
    if dist.is_initialized() and dist.get_rank() != 0:
        # The one call site for the other ranks: they join rank 0's generate calls until the
        # engine tells them to stop.
        engine.serve_forever()
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = create_app(engine, _model_name(server_args, args), sampling_params=SamplingParams,
                     max_batch_size=server_args.server_max_batch_size,
                     batch_requests=not server_args.no_request_batching)
    serve(app, server_args.host, server_args.port)


if __name__ == "__main__":
    main()
