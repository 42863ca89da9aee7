"""Test-only torchrun entry point for tests/chaos/test_elastic_restart.py: ``pretrain`` whose
rank 1 kills itself (SIGKILL) at its ``kill_at``-th model forward on the first attempt
(``TORCHELASTIC_RESTART_COUNT`` = 0), so torchrun restarts the job.

    python -m torch.distributed.run ... elastic_worker.py KILL_AT OUT_PREFIX [pretrain flags]

``KILL_AT`` 0 never kills. Rank 0 writes ``OUT_PREFIX.<attempt>.json`` with the iterations and
losses it trained.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from moecore.training import builders, pretrain


def main() -> None:
    kill_at, out, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    forwards = [0]

    def count_and_maybe_die(*_):
        forwards[0] += 1
        if attempt == 0 and rank == 1 and forwards[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def provider(config, args, ps, **stage):
        model = builders.default_model_provider(config, args, ps, **stage)
        model.register_forward_pre_hook(count_and_maybe_die)
        return model

    s = pretrain(argv, model_provider=provider, log=lambda _: None)
    if rank == 0:
        with open(f"{out}.{attempt}.json", "w") as f:
            json.dump({"iterations": s["iterations"], "lm_loss": s["lm_loss"]}, f)


if __name__ == "__main__":
    main()
