"""Speed benchmark of training and probing, on one machine, in one process:

    uv run --all-extras python scripts/bench.py [--quick] [--device auto|cpu|cuda] [--out FILE.json]
    uv run --all-extras python scripts/bench.py --runs [--quick] [--corpus FILE.txt] [--no-long] [--repeats N] [--out FILE.json]

It prints a machine line and markdown tables, and with --out writes every number as JSON. The
measurements live in scripts/bench_*.py (timing, machine, steps, trainer, runs, report); sections
1 to 6 are what one process measures in a few minutes; --runs measures whole runs instead
(sections 7 and 8, scripts/bench_runs.py: checkpoint schedules, thread settings), which takes
about an hour in full (--no-long leaves out the 10x longer run, --quick makes every run tiny).
What the sections are:

1. matmul peak: the best FLOP/s (2 n^3 / t) of square matmuls of a few sizes, best of several
   repeats; fp32 on CPU, bf16 on CUDA. It is this machine's measured peak, not a datasheet's.
2. per model size (d_model, n_ctx, batch) = (64, 64, 64) (the default), (128, 128, 32),
   (256, 256, 16), and on CUDA also (512, 1024, 16); 2 layers, the default n_heads (config),
   d_head = d_model / n_heads, the default vocabulary: training-step tokens/s (forward through the
   model's training path, cross-entropy as `Trainer.loss`, backward, grad-norm clip, AdamW with
   the config's hyperparameters; bf16 autocast on CUDA, like the trainer), achieved FLOP/s as a
   percentage of the measured matmul peak (MFU on CUDA), peak memory, and the speed ratio to
   TransformerLens's HookedTransformer built by analysis/export.py (`transformer_lens_state`: the
   same shapes and weights), trained with the same step, batch and AdamW, the same number of
   warmed-up steps, in timed blocks interleaved with ours (the ratio is the median over blocks
   of ours/TL). Batches are fixed uniform random token ids (the cost does not depend on them).
3. probe cost: the default config (logger=none), `train.loop.Trainer(cfg, tmp)`, trained
   `probe_train_steps` steps first (300 in the full run, none with --quick) and then the timed
   `Trainer.train_step` calls (345 and 10 steps in all; the JSON says), then `Trainer.evaluate()`
   timed (median of several after a warm-up) at one checkpoint of each distinct set of due
   callbacks in the default schedule (all callbacks; all but those with `every` > 1), divided by
   the median `Trainer.train_step` time on data batches; also the mean over the whole default
   schedule, and a per-callback breakdown (one extra evaluation each, each callback's call timed).
4. loop/step ratio: `Trainer.run()` without callbacks (callbacks.X=null for every entry), the
   default checkpoint schedule with its checkpoint writes, nothing subtracted, timed from start
   to end, against the bare step (same model config, one fixed batch, AdamW, clip) timed in the
   same process before and after the run. The full run trains the default total_tokens; --quick
   a short run, whose default schedule is much denser in checkpoints (the ratio is lower). The
   seconds spent inside run() in train_step, evaluate, save, the status.json writes
   (train/core/rundir.py write_status, under the key `_status`) and data.batch are reported too
   (the functions wrapped for the run; their overhead is negligible).
5. compile gain: training-step tokens/s of `torch.compile(model)` vs the eager model at the
   default size (first-call compile time reported apart); also `Trainer.train_step` with
   `train.compile=true` vs false when train/core/config.py TrainConfig has that flag (the training
   module prepared as `Trainer.run` prepares it; its first call reuses the graph compiled
   just before when dynamo can).
6. peak memory per size: on CPU the process's peak RSS (VmHWM) while that size's own model
   trains, reset before each size where Linux allows it (/proc/self/clear_refs), else the
   process high-water mark of resource.getrusage; it includes the interpreter and libraries. On
   CUDA torch.cuda.max_memory_allocated, reset per size.
7. (--runs) checkpoint schedules: the default run, its 1-layer control, `text_cpu` (with
   --corpus) and a 10x longer run, on a dense reference schedule, on the fixed schedule and under
   adaptive density, 3 seeds (--quick: one seed of tiny runs), trained in this process (its
   thread count): the callbacks' and the density watch's share of the run's wall, checkpoints
   (zoomed), the phase-change window of `python -m analysis`, the checkpoints in it and its edges
   against the fixed schedule's and the dense reference's.
8. (--runs) thread settings: the default run (--quick: a tiny smoke run) as `python -m train` in a
   subprocess, wall from start to exit, for threads=1, 2, auto and 2 with OMP_WAIT_POLICY=PASSIVE,
   idle and beside one busy process started by the benchmark, interleaved, median of 3 (--quick:
   threads=auto once, idle; --no-threads: left out). Definitions of both: scripts/bench_runs.py.

Model FLOPs per token of a training step (H = n_heads, E = d_head, L = n_layers, T = n_ctx,
V = d_vocab, D = d_model):

    N_mm      = L * (3 D H E  [W_Q, W_K, W_V]  +  H E D  [W_O])  +  D V  [W_U]
    FLOPs/tok = 6 N_mm  +  12 L T H E

6 N_mm: 2 FLOPs per multiply-add in the forward pass and twice that in the backward pass (input
and weight gradients) for every weight matrix a token passes through; W_E and W_pos are lookups
and additions, not matmuls. 12 L T H E: Q K^T and pattern @ V, 2 T E FLOPs each per head and
token forward, x3 for training, over the full T x T square (no causal halving: PaLM's MFU
convention, Chowdhery et al. 2022, appendix B). Biases, LayerNorm, softmax, the loss and the
optimizer are not counted. Achieved FLOP/s = FLOPs/tok x tokens/s, tokens = batch x n_ctx.

Timing: time.perf_counter, torch.cuda.synchronize around every timed region on CUDA, warm-up
steps before every timed block. No speed targets here or in the tests: this prints numbers.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()  # before the imports of torch and the project

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages and the benchmark's modules
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts.bench_machine import machine_info, matmul_peak, process_peak_rss  # noqa: E402
from scripts.bench_report import machine_line, schedule_tables, tables, thread_tables  # noqa: E402
from scripts.bench_runs import bench_schedules, bench_threads, runs_for  # noqa: E402
from scripts.bench_steps import bench_size, import_transformer_lens, warm_up_libraries  # noqa: E402
from scripts.bench_timing import settings_for  # noqa: E402
from scripts.bench_trainer import bench_compile, bench_loop, bench_probes  # noqa: E402
from train.core.device import select_device  # noqa: E402


def run_all(device: torch.device, quick: bool, use_tl: bool = True, say=print) -> dict[str, Any]:
    s = settings_for(device, quick)
    t0 = time.perf_counter()
    tl = import_transformer_lens() if use_tl else None
    result: dict[str, Any] = {"machine": machine_info(device), "quick": quick, "settings": dataclasses.asdict(s)}
    if not use_tl:
        result["machine"]["transformer_lens"] = None
    say("matmul peak ...")
    result["matmul_peak"] = peak = matmul_peak(device, s.matmul_sizes, s.matmul_repeats)
    warm_up_libraries(device)
    # The loop first, in a fresh process state: after the model sizes and TransformerLens the same
    # run is measurably slower (allocator and thread-pool state), which is not the loop's doing.
    say("loop vs step ...")
    result["loop"] = bench_loop(device, s)
    result["sizes"] = []
    for size in s.sizes:
        say(f"training step, d_model/n_ctx/batch {size} ...")
        result["sizes"].append(bench_size(*size, device, s, peak["peak_flops"], tl))
    say("probe cost ...")
    result["probes"] = bench_probes(device, s)
    say("torch.compile ...")
    result["compile"] = bench_compile(device, s)
    result["process_peak_rss_bytes"] = process_peak_rss()
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def run_whole(device: torch.device, quick: bool, corpus: Path | None, long: bool, say=print,
              repeats: int = 3, threads: bool = True) -> dict[str, Any]:
    """Sections 7 and 8 (scripts/bench_runs.py): whole runs (8 only with `threads`)."""
    r = runs_for(quick, corpus, long, repeats)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(device), "quick": quick, "runs": dataclasses.asdict(r)}
    result["schedules"] = bench_schedules(device, r, say)
    if threads:
        result["threads"] = bench_threads(r, say)
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (about a minute on 2 cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument("--without-transformer-lens", action="store_true",
                        help="leave TransformerLens out even when it is installed")
    parser.add_argument("--runs", action="store_true", help="whole runs: checkpoint schedules and thread settings")
    parser.add_argument("--corpus", type=Path, help="with --runs: a text file for the text_cpu case")
    parser.add_argument("--no-long", action="store_true", help="with --runs: leave out the 10x longer run")
    parser.add_argument("--repeats", type=int, default=3, help="with --runs: thread runs per setting and condition")
    parser.add_argument("--no-threads", action="store_true", help="with --runs: leave out the thread settings")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if args.runs:
        return _main_runs(args, device)
    result = run_all(device, args.quick, not args.without_transformer_lens,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
    result["wall_seconds_with_imports"] = time.perf_counter() - _T_START
    print(machine_line(result["machine"], result["matmul_peak"]["peak_flops"], result["matmul_peak"]["dtype"]))
    print()
    print(tables(result))
    print(f"\n{'quick' if args.quick else 'full'} benchmark: {result['wall_seconds']:.0f} s measuring, "
          f"{result['wall_seconds_with_imports']:.0f} s with the imports")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _main_runs(args, device: torch.device) -> int:
    result = run_whole(device, args.quick, args.corpus, not args.no_long,
                       say=lambda line: print(line, file=sys.stderr, flush=True), repeats=args.repeats,
                       threads=not args.no_threads)
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cpu_count']} cores ({m['cpu_usable']} usable), torch {m['torch']} with "
          f"{m['torch_threads']} threads in this process")
    print()
    print(schedule_tables(result["schedules"]))
    if "threads" in result:
        print()
        print(thread_tables(result["threads"]))
    print(f"\n{'quick' if args.quick else 'full'} whole-run benchmark: {result['wall_seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
