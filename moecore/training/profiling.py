"""Megatron's profiling flags for the training loop.

``--profile`` profiles iterations ``--profile-step-start`` .. ``--profile-step-end - 1``
(1-based, as the log's iteration numbers) on the ranks in ``--profile-ranks``:

- with ``--use-pytorch-profiler``: ``torch.profiler`` (CPU and CUDA activities, shapes, stacks),
  one warm-up iteration before the window when there is one, the trace written by
  ``tensorboard_trace_handler`` into ``--profile-dir`` (default ``--tensorboard-dir``; open it
  in TensorBoard or Perfetto);
- otherwise for nsys: ``cudaProfilerStart``/``Stop`` around the window and autograd NVTX
  ranges inside it (``nsys profile -c cudaProfilerApi python pretrain_gpt.py ...``).

``--record-memory-history`` records CUDA allocations from the start and writes a snapshot to
``--memory-snapshot-path`` once iteration ``--profile-step-end - 1`` is done (or when training
ends first), on the same ranks.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist


class TrainingProfiler:
    """``before(it)`` / ``after(it)`` around training iteration ``it``; ``close()`` at the end."""

    def __init__(self, args):
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.on_rank = rank in args.profile_ranks
        self.profile = bool(args.profile) and self.on_rank
        self.torch_profiler = self.profile and args.use_pytorch_profiler
        self.memory = bool(args.record_memory_history) and self.on_rank
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.last = min(self.end - 1, args.train_iters)  # the last profiled iteration
        self.trace_dir = args.profile_dir or args.tensorboard_dir
        self.snapshot_path = args.memory_snapshot_path
        self._prof = None
        self._nvtx = None
        self._snapshot_written = False
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def before(self, it: int) -> None:
        if not self.profile:
            return
        if self.torch_profiler and self._prof is None and it >= self.start - 1 and it < self.end:
            warmup = 1 if it == self.start - 1 and it >= 1 else 0
            active = self.end - max(it + warmup, self.start)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=True,
                schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=active, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir))
            self._prof.start()
        elif not self.torch_profiler and it == self.start:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()

    def after(self, it: int) -> None:
        if self._prof is not None:
            if it >= self.last:
                self._stop_torch()
            else:
                self._prof.step()
        if self._nvtx is not None and it >= self.last:
            self._stop_nsys()
        if self.memory and it >= self.last:
            self._write_snapshot()

    def close(self) -> None:
        """Stop whatever is still running (training ended inside the window)."""
        if self._prof is not None:
            self._stop_torch()
        if self._nvtx is not None:
            self._stop_nsys()
        if self.memory:
            self._write_snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False

    def _stop_torch(self) -> None:
        prof, self._prof = self._prof, None
        prof.stop()

    def _stop_nsys(self) -> None:
        nvtx, self._nvtx = self._nvtx, None
        nvtx.__exit__(None, None, None)
        torch.cuda.cudart().cudaProfilerStop()

    def _write_snapshot(self) -> None:
        if self._snapshot_written:
            return
        self._snapshot_written = True
        with open(self.snapshot_path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
