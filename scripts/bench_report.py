"""The benchmark's printed report (scripts/bench.py): the machine line and the markdown tables
the README's Speed section shows."""
from __future__ import annotations

from typing import Any

from scripts.bench_steps import TL_MISSING


def fmt_si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_flops(x: float) -> str:
    return fmt_si(x, "FLOP/s")


def fmt_memory(m: dict[str, Any]) -> str:
    if m["bytes"] is None:
        return "n/a"
    growth = "" if m["baseline_bytes"] is None else f" (+{(m['bytes'] - m['baseline_bytes']) / 2**20:.0f})"
    return f"{m['bytes'] / 2**20:.0f} MiB{growth}"


def machine_line(info: dict[str, Any], peak: float, dtype: str) -> str:
    gpu = f"GPU {info['gpu']} (CUDA {info.get('cuda')})" if info["gpu"] else "no GPU"
    tl = f"TransformerLens {info['transformer_lens']}" if info["transformer_lens"] else TL_MISSING
    return (f"machine: {info['cpu']}, {info['cpu_count']} cores ({info['cpu_usable']} usable), "
            f"torch {info['torch']} with {info['torch_threads']} threads, {gpu}, {tl}; "
            f"measured {dtype} matmul peak {fmt_flops(peak)}")


def tables(r: dict[str, Any]) -> str:
    cuda = r["machine"]["gpu"] is not None
    pct = "MFU" if cuda else "% of fp32 peak"
    mem = "peak CUDA memory (+ over the start)" if cuda else "peak RSS (+ over the start)"
    lines = [f"| d_model / n_ctx / batch | params | FLOP/token | tokens/s | {pct} | ours/TransformerLens | {mem} |",
             "|---|---|---|---|---|---|---|"]
    for row in r["sizes"]:
        tl = row["transformer_lens"]
        vs = TL_MISSING if tl["status"] != "measured" else \
            f"{tl['ratio_ours_over_tl']:.2f}x ({fmt_si(tl['tokens_per_second'], 'tok/s')} TL)"
        lines.append(f"| {row['d_model']} / {row['n_ctx']} / {row['batch']} | {row['params']:,} | "
                     f"{fmt_si(row['flops_per_token']['total'], 'FLOP')} | {fmt_si(row['tokens_per_second'], 'tok/s')} | "
                     f"{row['percent_of_peak']:.1f}% | {vs} | {fmt_memory(row['peak_memory'])} |")
    p, loop, c = r["probes"], r["loop"], r["compile"]
    lines += ["", "| measurement (default config) | value | detail |", "|---|---|---|"]
    lines.append(f"| matmul peak ({r['matmul_peak']['dtype']}) | {fmt_flops(r['matmul_peak']['peak_flops'])} | "
                 + ", ".join(f"n={n}: {fmt_flops(v)}" for n, v in r["matmul_peak"]["flops_by_size"].items()) + " |")
    trained = f"model trained {p['model_trained_steps']} steps" if p["model_trained_steps"] else "untrained model"
    lines.append(f"| Trainer.train_step | {p['train_step_seconds'] * 1e3:.1f} ms | median of {p['train_step_samples']} "
                 f"data batches |")
    for k in p["kinds"]:
        which = "without " + ", ".join(k["not_due"]) if k["not_due"] else "all callbacks"
        lines.append(f"| probe cost per checkpoint, {which} | {k['in_train_steps']:.1f} train steps | "
                     f"evaluate() {k['evaluate_seconds'] * 1e3:.0f} ms, {k['checkpoints_in_schedule']} of "
                     f"{p['checkpoints']} checkpoints, {trained} |")
    lines.append(f"| probe cost, mean over the schedule | {p['mean_in_train_steps']:.1f} train steps | "
                 f"{p['checkpoints']} checkpoints add {100 * p['schedule_share_of_step_time']:.0f}% to the "
                 f"{p['total_steps']} steps' time |")
    lines.append(f"| loop / bare step (no callbacks) | {loop['loop_over_step']:.2f} | "
                 f"Trainer.run {fmt_si(loop['loop_tokens_per_second'], 'tok/s')} ({loop['steps']} steps, "
                 f"{loop['checkpoints']} checkpoints, {loop['run_seconds']:.1f} s) vs bare "
                 f"{fmt_si(loop['bare_tokens_per_second'], 'tok/s')}; inside run: "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in loop["seconds_inside"].items()) + " |")
    lines.append(f"| torch.compile gain (median of paired blocks) | {c['gain']:.2f}x | "
                 f"{fmt_si(c['compiled_tokens_per_second'], 'tok/s')} vs "
                 f"eager {fmt_si(c['eager_tokens_per_second'], 'tok/s')}; first call {c['first_call_seconds']:.1f} s |")
    t = c.get("trainer")
    if t and t["status"] == "measured":
        lines.append(f"| train.compile=true gain (Trainer, paired blocks) | {t['gain']:.2f}x | Trainer.train_step "
                     f"{fmt_si(t['compiled_tokens_per_second'], 'tok/s')} vs {fmt_si(t['eager_tokens_per_second'], 'tok/s')}"
                     f"; first call {t['first_call_seconds']:.1f} s |")
    elif t:
        lines.append(f"| train.compile=true gain (Trainer) | n/a | {t['status']} |")
    else:
        lines.append("| train.compile=true gain (Trainer) | n/a | train/core/config.py TrainConfig has no `compile` flag |")
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def signed_pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def tokens(x: float | None) -> str:
    return "none" if x is None else f"{x / 1e6:.3f}M"


def schedule_tables(results: list[dict[str, Any]]) -> str:
    """Section 7 (scripts/bench_runs.py): one row per run."""
    lines = ["| case | seed | schedule | checkpoints (zoomed) | callbacks / wall | watch / wall | run wall | "
             "window (start - end) | checkpoints in window | edge shift vs fixed (start, end) | "
             "edge error vs dense (start, end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["window"]
        window = "none" if w is None else f"{tokens(w['start_tokens'])} - {tokens(w['end_tokens'])}"
        moved, error = (("n/a" if e is None else f"{fmt(e['start'])}, {fmt(e['end'])}")
                        for e, fmt in ((r["edge_shift"], pct), (r.get("edge_error"), signed_pct)))
        lines.append(f"| {r['case']} | {r['seed']} | {r['schedule']} | {r['checkpoints']} ({r['zoomed']}) | "
                     f"{pct(r['callback_share'])} | {pct(r['watch_share'])} | {r['run_seconds']:.1f} s | {window} | "
                     f"{'n/a' if r['in_window'] is None else r['in_window']} | {moved} | {error} |")
    return "\n".join(lines)


def thread_tables(t: dict[str, Any]) -> str:
    """Section 8 (scripts/bench_runs.py): median wall per thread setting, idle and busy."""
    busy = "busy" in t["median_wall"]
    lines = [f"| threads ({t['config']} run) | idle wall | " + ("beside a busy process | busy / idle | " if busy else "")
             + "auto chose |", "|---|---|" + ("---|---|" if busy else "") + "---|"]
    for setting, idle in t["median_wall"]["idle"].items():
        chose = "; ".join(f"{c}: {', '.join(sorted(set(l.split(', ', 1)[-1] for l in by[setting])))}"
                          for c, by in t["start_lines"].items())
        row = f"| {setting} | {idle:.1f} s | "
        if busy:
            row += f"{t['median_wall']['busy'][setting]:.1f} s | {t['busy_over_idle'][setting]:.2f}x | "
        lines.append(row + f"{chose if setting == 'auto' else ''} |")
    return "\n".join(lines)
