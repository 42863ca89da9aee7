"""FP8 training quality against bf16 on real text (issue 21's quality criteria), one GPU.

    python benchmarks/fp8_quality.py --size shakespeare --seeds 1337 1234 --json q.json
    python benchmarks/fp8_quality.py --size larger --seeds 1337 1234
    python benchmarks/fp8_quality.py --size e2e-bpe --recipes tensorwise --iters 2000
    python benchmarks/fp8_quality.py --smoke       # CPU: the tiny example, emulated FP8 GEMMs

``shakespeare`` and ``larger`` run the Shakespeare example (``examples/shakespeare_moe/run.sh``,
its full GPU size; ``larger``: 8 layers, hidden 768, 12 heads, expert FFN 1024 on top) once per
seed in bf16 and once per seed under each ``--recipes`` entry (hybrid format), and compare the
best validation loss of each FP8 run with the bf16 run of the same seed (criterion: within 1%).
``e2e-bpe`` trains ``benchmarks/e2e.py``'s model (hidden 1024, 16 layers, 16 experts top-2,
seq 2048) on the Shakespeare text tokenised by a SentencePiece BPE model of ``--bpe-vocab``
pieces trained here on the same text, under each recipe only, for ``--iters`` steps, and reports
whether training diverged (a non-finite or skipped step, or a training loss that ends above its
early level). The corpus: ``--input``, ``$SHAKESPEARE_PATH`` or the copy beside a checkout (see
``examples/shakespeare_moe/prepare.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "shakespeare_moe"))

from e2e import COMMON, MODEL, TINY, fp8_flags, without  # noqa: E402

LARGER = ["--num-layers", "8", "--hidden-size", "768", "--num-attention-heads", "12",
          "--ffn-hidden-size", "3072", "--moe-ffn-hidden-size", "1024"]
VAL_RE = re.compile(r"validation loss at iteration (\d+)(?: on validation set)? \| "
                    r"lm loss value: (\S+)")
TRAIN_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|.*?"
                      r"number of skipped iterations:\s+(\d+) \| number of nan iterations:\s+(\d+)")


def recipe_flags(recipe: str | None, smoke: bool) -> list[str]:
    """None (bf16): no flags; else :func:`e2e.fp8_flags` (emulated GEMMs in a smoke run)."""
    return [] if recipe is None else fp8_flags(recipe, emulated=smoke)


def parse_log(text: str) -> dict:
    """Validation losses by iteration, training losses, and skipped/NaN iteration counts."""
    val: dict[int, float] = {}
    for it, v in VAL_RE.findall(text):
        val[int(it)] = float(v)
    train, skipped, nan = [], 0, 0
    for it, loss, sk, na in TRAIN_RE.findall(text):
        train.append((int(it), float(loss)))
        skipped, nan = skipped + int(sk), nan + int(na)
    finite = all(math.isfinite(v) for v in val.values()) and all(
        math.isfinite(loss) for _, loss in train)
    return {"val": val, "best_val": min(val.values()) if val else None,
            "final_val": val[max(val)] if val else None, "train": train,
            "skipped": skipped, "nan": nan, "finite": finite}


def run(cmd: list[str], env: dict, log: Path | None) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(text)
    if proc.returncode != 0:
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        return {"status": f"exit {proc.returncode}: " + " / ".join(tail)[:400]}
    return {"status": "ok", **parse_log(text)}


def example_run(seed: int, recipe: str | None, args, env: dict) -> dict:
    """One run of the Shakespeare example (run.sh's own sizes; ``--size larger`` on top)."""
    extra = (LARGER if args.size == "larger" and not args.smoke else []) + [
        "--seed", str(seed), "--log-interval", str(args.log_interval)] + recipe_flags(
        recipe, args.smoke) + (["--train-iters", str(args.iters), "--lr-decay-iters",
                                str(args.iters), "--lr-warmup-iters", str(max(1, args.iters // 10))]
                              if args.iters else [])
    log = args.log_dir / f"{args.size}-{recipe or 'bf16'}-{seed}.log" if args.log_dir else None
    return run(["bash", "examples/shakespeare_moe/run.sh", *extra], env, log)


def prepare_bpe(args, work: Path) -> tuple[str, Path]:
    """The Shakespeare text as 10 contiguous documents, tokenised by a SentencePiece BPE model
    trained on it: ``(data prefix, model file)``."""
    import sentencepiece as spm  # noqa: PLC0415 - a required dependency
    from prepare import find_text, write_chunks  # noqa: PLC0415 - examples/shakespeare_moe
    text = find_text(argparse.Namespace(input=args.input, url="", out_dir=str(work)))
    if text is None:
        raise SystemExit("no Shakespeare text: pass --input PATH or set SHAKESPEARE_PATH")
    work.mkdir(parents=True, exist_ok=True)
    model_prefix = work / f"bpe{args.bpe_vocab}"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(model_prefix),
                                   vocab_size=args.bpe_vocab, model_type="bpe",
                                   character_coverage=1.0, num_threads=4, minloglevel=2)
    chunks = work / "chunks.jsonl"
    write_chunks(Path(text).read_text(encoding="utf-8"), chunks, 10)
    prefix = work / "shakespeare_bpe"
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(chunks),
                    "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", f"{model_prefix}.model", "--append-eod"],
                   cwd=ROOT, check=True, capture_output=True)
    return f"{prefix}_text_document", Path(f"{model_prefix}.model")


def e2e_bpe_run(recipe: str | None, args, env: dict, data: str, model: Path) -> dict:
    """``benchmarks/e2e.py``'s model on the BPE-tokenised text for ``--iters`` steps."""
    common = without(COMMON, {"--mock-data": 0, "--tokenizer-type": 1, "--vocab-size": 1,
                              "--split": 1, "--eval-iters": 1, "--eval-interval": 1})
    iters = args.iters or 2000
    argv = (TINY if args.smoke else MODEL) + common + [
        "--data-path", data, "--split", "90,10,0", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(model), "--train-iters", str(iters), "--lr-decay-iters",
        str(iters), "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size",
        str(args.micro_batch_size), "--log-interval", str(args.log_interval),
        "--eval-interval", str(max(1, iters // 10)), "--eval-iters", "4", "--seed", "1234"]
    argv += ["--device", "cpu", "--num-workers", "0"] if args.smoke else [
        "--bf16", "--cuda-graph-impl", "local", "--cuda-graph-warmup-steps", "2"]
    log = args.log_dir / f"e2e-bpe-{recipe or 'bf16'}.log" if args.log_dir else None
    res = run([sys.executable, "pretrain_gpt.py", *argv, *recipe_flags(recipe, args.smoke)], env,
              log)
    if res["status"] == "ok" and res["train"]:
        losses = [loss for _, loss in res["train"]]
        early = min(losses[: max(1, len(losses) // 10)])
        res["diverged"] = (not res["finite"]) or res["nan"] > 0 or res["skipped"] > 0 \
            or losses[-1] > early
        res["first_last_train"] = (losses[0], losses[-1])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("shakespeare", "larger", "e2e-bpe"), default="shakespeare")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1234])
    p.add_argument("--recipes", nargs="+", default=["tensorwise"],
                   choices=("tensorwise", "delayed", "blockwise"))
    p.add_argument("--iters", type=int, default=None, help="training steps (default: the "
                   "example's 1000; e2e-bpe 2000)")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--micro-batch-size", type=int, default=8, help="e2e-bpe (= global batch)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs (shakespeare, "
                   "larger): FP8 runs only, no comparison")
    p.add_argument("--bpe-vocab", type=int, default=8192)
    p.add_argument("--input", default=None, help="tinyshakespeare input.txt")
    p.add_argument("--log-dir", type=Path, default=None, help="keep every run's output here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="CPU: tiny sizes, few steps, FP8 through the emulated GEMMs")
    args = p.parse_args()
    if args.smoke:
        args.iters = args.iters or 20
        args.log_interval = min(args.log_interval, 5)
        args.micro_batch_size = min(args.micro_batch_size, 2)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHON=sys.executable)
    if args.input:
        env["SHAKESPEARE_INPUT"] = str(Path(args.input).resolve())
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    results: list[dict] = []
    if args.size == "e2e-bpe":
        with tempfile.TemporaryDirectory() as tmp:
            data, model = prepare_bpe(args, Path(tmp))
            for recipe in args.recipes:
                r = e2e_bpe_run(recipe, args, env, data, model)
                results.append({"size": args.size, "recipe": recipe, **r})
                save(args.json, results)
                print(f"{recipe}: {r['status']}, diverged={r.get('diverged')}, train loss "
                      f"first/last {r.get('first_last_train')}, best val {r.get('best_val')}, "
                      f"skipped {r.get('skipped')}, nan {r.get('nan')}", flush=True)
    else:
        for seed in args.seeds:
            base = None
            for recipe in ([] if args.no_bf16 else [None]) + args.recipes:
                r = example_run(seed, recipe, args, env)
                if recipe is None:
                    base = r
                elif base is not None and r["status"] == base["status"] == "ok":
                    r["best_vs_bf16"] = r["best_val"] / base["best_val"] - 1.0
                results.append({"size": args.size, "seed": seed, "recipe": recipe or "bf16", **r})
                save(args.json, results)
                print(f"seed {seed} {recipe or 'bf16'}: {r['status']}, best val "
                      f"{r.get('best_val')}, final val {r.get('final_val')}", flush=True)
        print(f"{'size':<12}{'seed':>6} {'run':<11}{'best val':>10}{'final val':>10}"
              f"{'vs bf16':>9}  status")
        for r in results:
            d = r.get("best_vs_bf16")
            print(f"{r['size']:<12}{r['seed']:>6} {r['recipe']:<11}"
                  f"{r.get('best_val') or float('nan'):>10.4f}"
                  f"{r.get('final_val') or float('nan'):>10.4f}"
                  f"{'' if d is None else f'{d * 100:+.2f}%':>9}  {r['status']}")
    save(args.json, results)


def save(path: Path | None, results: list[dict]) -> None:
    """Write the runs so far to ``path`` (after every run: a cut-off call keeps what ended)."""
    if path is None:
        return
    rows = [{k: ({str(i): v for i, v in r[k].items()} if k == "val" else r[k])
             for k in r if k != "train"} for r in results]
    path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
