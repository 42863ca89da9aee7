"""Run bookkeeping: iteration and data position, interval averages, log lines, metric writers,
throughput/MFU, and the summary ``pretrain`` returns."""

from __future__ import annotations

import math
import time

import torch

from moecore.arguments import transformer_config_from_args
from moecore.models.mtp import MTP_LOSS_NAME
from moecore.moe.losses import MoELossTracker
from moecore.optimizer import get_params_norm
from moecore.training import mfu as mfu_lib
from moecore.training.logger import MetricWriters, format_train_line, format_validation_lines


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _zeros(pending: dict) -> tuple:
    """The iteration's zero-gradient count (``--log-num-zeros-in-grad``), if it has one."""
    return () if pending.get("num_zeros") is None else (pending["num_zeros"],)


class RunState:
    """Everything about a run that changes per iteration and is not model/optimizer state."""

    def __init__(self, args, ps, model, optimizer, log):
        self.args, self.ps, self.model, self.optimizer, self.log = args, ps, model, optimizer, log
        self.config = transformer_config_from_args(args)
        self.iteration = self.start_iteration = 0
        self.consumed_train_samples = self.consumed_valid_samples = 0
        # The current step's batch (a --rampup-batch-size ramp changes it; see set_batch).
        self.global_batch_size, self.num_microbatches = args.global_batch_size, \
            args.num_microbatches
        self.writers = MetricWriters(args)
        self.flops_per_token = mfu_lib.flops_per_token(self.config, args.padded_vocab_size,
                                                       args.seq_length)
        self.peak = mfu_lib.peak_tflops(args.device, self.config.params_dtype, args.peak_tflops)
        self.moe_layers = [i for i, m in enumerate(self.config.moe_layer_pattern()) if m]
        self._reset_interval()
        self.history: dict = {"iterations": [], "lm_loss": [], "grad_norm": [], "lr": [],
                              "val_loss": {}, "tokens_per_sec": [], "mfu": [], "moe_losses": [],
                              "phase_ms": [], "peak_memory_gib": []}
        self.test_loss = None

    # ---- resume ----------------------------------------------------------------------------
    def restore(self, loaded: dict) -> None:
        self.iteration = self.start_iteration = loaded["iteration"]
        self.consumed_train_samples = loaded["consumed_train_samples"]
        self.consumed_valid_samples = loaded["consumed_valid_samples"]
        self.log(f" > resumed from --load {self.args.load} at iteration {self.iteration} "
                 f"(consumed samples: {self.consumed_train_samples})")

    def data_state(self) -> dict:
        return {"consumed_train_samples": self.consumed_train_samples,
                "consumed_valid_samples": self.consumed_valid_samples}

    def set_batch(self, global_batch_size: int, num_microbatches: int) -> None:
        """The next step's global batch size and micro-batches per data-parallel rank."""
        self.global_batch_size, self.num_microbatches = global_batch_size, num_microbatches

    def batch_kwargs(self) -> dict:
        """The current batch as ``evaluate``'s keywords (evaluations use the step's size)."""
        return {"num_microbatches": self.num_microbatches,
                "global_batch_size": self.global_batch_size}

    # ---- start-up ----------------------------------------------------------------------------
    def log_startup(self, tokenizer) -> None:
        a, ps = self.args, self.ps
        vp = a.virtual_pipeline_model_parallel_size
        self.log(f" > world size {ps.sizes.world_size}: tp={ps.tp_size} pp={ps.pp_size}"
                 f"{f' (x{vp} virtual stages)' if vp else ''} "
                 f"dp={ps.dp_size} cp={ps.cp_size} ep={ps.ep_size} etp={ps.etp_size} "
                 f"edp={ps.edp_size}; {a.num_microbatches} micro-batches of {a.micro_batch_size} "
                 f"per step (global batch {a.global_batch_size}); device {a.device}, "
                 f"dtype {self.config.params_dtype}")
        self.log(f" > tokenizer {a.tokenizer_type or 'NullTokenizer'}: vocab {tokenizer.vocab_size}"
                 f" padded to {a.padded_vocab_size}")
        total = mfu_lib.matmul_params(self.config, a.padded_vocab_size, active_only=False)
        active = mfu_lib.matmul_params(self.config, a.padded_vocab_size, active_only=True)
        chunks = self.model if isinstance(self.model, (list, tuple)) else [self.model]
        n_model = sum(c.num_parameters() for c in chunks) \
            if all(hasattr(c, "num_parameters") for c in chunks) else None
        self.log(f" > parameters: {n_model if n_model is not None else 'n/a'} total; matmul "
                 f"weights {total:,} of which {active:,} active per token; "
                 f"{self.flops_per_token:.4g} training FLOPs/token")
        b = self.optimizer.state_bytes()
        kind = "distributed optimizer, sharded over data parallel" \
            if a.use_distributed_optimizer else "replicated over data parallel"
        self.log(f" > optimizer state bytes per rank: {b['total']:,} (fp32 main params "
                 f"{b['main_params']:,}, main grads {b['main_grads']:,}, Adam moments "
                 f"{b['adam_moments']:,}; {kind}; rank {ps.rank})"
                 + (f"; replicated AdamW would hold {b['replicated_total']:,}"
                    if "replicated_total" in b else ""))
        if getattr(a, "checkpoint_args_taken", None):
            self.log(" > --use-checkpoint-args: from the checkpoint in --load: " + ", ".join(
                f"{k}={v}" for k, v in a.checkpoint_args_taken.items()))
        if getattr(a, "noop_flags_given", None):
            self.log(" > accepted for Megatron-LM compatibility, no effect in moecore: "
                     + " ".join(a.noop_flags_given))
        if self.peak is None and a.device == "cuda":
            self.log(" > MFU: unknown GPU peak; pass --peak-tflops to report it")

    # ---- per iteration -------------------------------------------------------------------------
    def _reset_interval(self) -> None:
        self._time = 0.0
        self._iters = 0
        self._samples = 0  # of the interval's steps (a batch size ramp-up varies them)
        self._sums: dict[str, float] = {}
        self._grad_norm = None
        self._num_zeros = None
        self._skipped = self._nan = 0
        self._phase_ms: dict[str, float] = {}
        self._pending: list[dict] = []

    def iteration_start(self) -> None:
        self._t0 = time.perf_counter()

    def _moe_losses(self) -> dict[str, torch.Tensor]:
        """Per-name MoE losses of this iteration (0-dim device tensors): mean over MoE layers of
        the per-layer values (summed over micro-batches, so divided by their number), averaged
        over DP ranks; and the multi-token prediction losses, one per depth (``mtp_<k> loss``,
        Megatron's names)."""
        if not self.moe_layers and not self.config.mtp_num_layers:
            return {}
        reduced = MoELossTracker.reduce(group=self.ps.pp_group,
                                        avg_group=self.ps.group("data_parallel_with_cp"))
        out = {}
        for name, values in reduced.items():
            if name == MTP_LOSS_NAME:
                for k in range(values.numel()):
                    out[f"mtp_{k + 1} loss"] = values[k].float() / self.num_microbatches
                continue
            layers = [i for i in self.moe_layers if i < values.numel()]
            if layers:
                v = values[layers].float() / self.num_microbatches
                out[name] = v.mean()
                if self.args.moe_per_layer_logging:
                    self.writers.scalars({f"moe/{name}_layer_{i}": float(v[j]) for j, i in
                                          enumerate(layers)}, self.iteration)
        MoELossTracker.clear()
        return out

    def iteration_end(self, out: dict, flush: bool = False) -> None:
        """Book one iteration of :func:`train_step` (``out``).

        The loss and MoE losses stay on the device and the device is not synchronised, so the
        host can fetch and launch the next iteration while this one's optimizer step still runs.
        Values are read (one sync) at log iterations, TensorBoard/wandb iterations, and when
        ``flush`` is set (the caller is about to evaluate, save or stop).
        """
        a = self.args
        self.iteration += 1
        self.consumed_train_samples += self.global_batch_size
        self._pending.append({"iteration": self.iteration, "loss": out["lm loss"],
                              "moe": self._moe_losses(), "grad_norm": out["grad_norm"],
                              "lr": out["lr"], "updated": out["updated"],
                              "timer": out.get("timer"), "num_zeros": out.get("num_zeros"),
                              "global_batch_size": self.global_batch_size})
        log = self.iteration % a.log_interval == 0
        write = bool(a.tensorboard_log_interval and self.writers.active
                     and self.iteration % a.tensorboard_log_interval == 0)
        if flush or log or write:
            _sync(a.device)
        self._time += time.perf_counter() - self._t0
        self._iters += 1
        self._samples += self.global_batch_size
        if flush or log or write:
            self._read_pending()
        if log:
            self._log_interval(out["lr"])

    def _read_pending(self) -> None:
        """Turn the pending iterations' device values into floats (one device-to-host copy) and
        book them: interval sums, NaN count, phase times, history, metric writers."""
        pending, self._pending = self._pending, []
        values = [v for p in pending for v in (p["loss"], *p["moe"].values(), *_zeros(p))]
        # fp64: exact for the losses and for zero counts past 2^24
        tensors = [v.detach().double().reshape(()) for v in values if torch.is_tensor(v)]
        host = iter(torch.stack(tensors).tolist() if tensors else [])
        floats = iter([next(host) if torch.is_tensor(v) else float(v) for v in values])
        a, h = self.args, self.history
        for p in pending:
            loss = next(floats)
            moe = {k: next(floats) for k in p["moe"]}
            zeros = [next(floats) for _ in _zeros(p)]
            if not p["updated"]:
                self._skipped += 1
            if not math.isfinite(loss):
                self._nan += 1
            else:
                for k, v in {"lm loss": loss, **moe}.items():
                    self._sums[k] = self._sums.get(k, 0.0) + v
            self._grad_norm = p["grad_norm"]
            if zeros:
                self._num_zeros = zeros[0]
            if p["timer"] is not None:  # its events are complete: synchronised above
                for k, v in p["timer"].elapsed_ms().items():
                    self._phase_ms[k] = self._phase_ms.get(k, 0.0) + v
            h["iterations"].append(p["iteration"])
            h["lm_loss"].append(loss)
            h["grad_norm"].append(p["grad_norm"])
            h["lr"].append(p["lr"])
            h["moe_losses"].append(moe)
            if a.tensorboard_log_interval and p["iteration"] % a.tensorboard_log_interval == 0:
                self._write_scalars(p["iteration"], loss, p, moe, zeros)

    def _write_scalars(self, iteration: int, loss: float, p: dict, moe: dict,
                       zeros: list[float]) -> None:
        vals = {"lm loss": loss, "learning-rate": p["lr"],
                "batch-size": p["global_batch_size"],  # this step's (a ramp-up varies it)
                **{k if k.startswith("mtp_") else f"moe/{k}": v for k, v in moe.items()}}
        if p["grad_norm"] is not None:
            vals["grad-norm"] = p["grad_norm"]
        if zeros:
            vals["num-zeros"] = zeros[0]
        if self.args.fp16 and self.args.log_loss_scale_to_tensorboard:
            vals["loss-scale"] = float(self.optimizer.get_loss_scale().item())
        self.writers.scalars(vals, iteration)

    def _log_interval(self, lr: float) -> None:
        a = self.args
        ms = 1000.0 * self._time / max(self._iters, 1)
        good = max(self._iters - self._nan, 1)
        losses = {k: v / good for k, v in self._sums.items()}
        tok_s = self._samples * a.seq_length / max(self._time, 1e-9)
        util = mfu_lib.mfu(tok_s, self.flops_per_token, self.ps.sizes.world_size, self.peak)
        params_norm = None
        if a.log_params_norm:
            self.optimizer.sync_params()
            chunks = self.model if isinstance(self.model, (list, tuple)) else [self.model]
            params_norm = get_params_norm([p for c in chunks for p in c.parameters()], self.ps)
        self.log(format_train_line(
            self.iteration, a.train_iters, self.consumed_train_samples, ms, lr,
            self.global_batch_size, losses, self._grad_norm, tok_s, util,
            loss_scale=float(self.optimizer.get_loss_scale().item()) if a.fp16 else None,
            params_norm=params_norm, skipped=self._skipped, nan=self._nan,
            num_zeros=self._num_zeros))
        self.history["tokens_per_sec"].append(tok_s)
        self.history["mfu"].append(util)
        # Per-iteration means over the interval (GPU timeline of each phase; {} off CUDA).
        self.history["phase_ms"].append({k: v / max(self._iters, 1)
                                         for k, v in self._phase_ms.items()})
        self.history["peak_memory_gib"].append(
            torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None)
        extra = {"throughput/tokens-per-sec": tok_s}
        if util is not None:
            extra["throughput/mfu"] = util
        self.writers.scalars(extra, self.iteration)
        self._reset_interval()

    def log_validation(self, prefix: str, losses: dict[str, float], iteration: int,
                       split: str = "valid") -> None:
        self.log(format_validation_lines(prefix, losses))
        if split == "valid":
            self.history["val_loss"][iteration] = losses["lm loss"]
        vals = {f"{k} validation": v for k, v in losses.items()}
        if self.args.log_validation_ppl_to_tensorboard:
            vals.update({f"{k} validation ppl": math.exp(min(20.0, v))
                         for k, v in losses.items()})
        self.writers.scalars(vals if split == "valid" else
                             {f"{k} test": v for k, v in losses.items()}, iteration)

    # ---- end ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        _sync(self.args.device)
        self._read_pending()
        return {**self.history, "test_loss": self.test_loss,
                "start_iteration": self.start_iteration, "final_iteration": self.iteration,
                "consumed_train_samples": self.consumed_train_samples,
                "flops_per_token": self.flops_per_token}

    def close(self) -> None:
        self.writers.close()
