"""Attention patterns of the detected induction heads, for the report.

For each detected induction head (a head with a prefix-matching rise, train/core/phase.py) and its
previous-token partner, the attention pattern A[query, key] (train/core/metrics.py
`attention_patterns`) at three saved checkpoints: the last one before the phase-change window
starts, the one nearest the steepest point, and the first one after the window ends. Two inputs:
the run's first prefix-matching probe (BOS + a random segment repeated) and the held-out sequence
with the most repeated tokens. Drawn as static figures, and as an interactive view (hover a
token: every head's attention from it, at each checkpoint) that is plain HTML and JavaScript, so
it works offline inside the self-contained report. Text runs show their tokens as text (the
run's own tokenizer, Run.tokenizer_dir), other runs as ids. Colours run from 0 to the head's
largest weight off the BOS column (`scale`), so a head that parks most of its attention on BOS
still shows where the rest goes; the static figures carry a colour bar per head.

Partner of an induction head at layer l: the head of an earlier layer that maximises
previous_token(partner) x max(k_composition(head, partner), 0) at the last checkpoint (Olsson et
al.'s circuit: a previous-token head whose output the induction head's keys read); by
previous_token alone when the run has no K-composition scores."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from train.core import names as N
from train.core.phase import fmt_tokens
from train.core.runs import Checkpoint, Run

MOMENTS = ("before", "during", "after")
CAPTIONS = {f"attention_{key}": f"attention patterns on the {name} sequence: the induction heads and their "
                                f"previous-token partners before, during and after the window"
            for key, name in (("probe", "probe"), ("heldout", "held-out"))}


def partner(row: dict[str, Any], head: str) -> str | None:
    """The previous-token partner of `head` (module docstring) from one row, or None."""
    layer, h = N.parse_head_name(head)
    best, best_score = None, 0.0
    for l0, h0 in N.heads_in(row, N.PREVIOUS_TOKEN):
        if l0 >= layer:
            continue
        score = float(row[N.head_key(N.PREVIOUS_TOKEN, l0, h0)])
        comp_key = N.pair_key(N.composition("k"), (layer, h), (l0, h0))
        if comp_key in row:
            score *= max(float(row[comp_key]), 0.0)
        if score > best_score:
            best, best_score = N.head_name(l0, h0), score
    return best


def moment_checkpoints(run: Run, window: dict[str, Any]) -> dict[str, Checkpoint]:
    """{before, during, after}: saved checkpoints (with weights) around a window (module docstring)."""
    saved = run.checkpoints(weights=True)
    if not saved:
        return {}
    out = {}
    before = [c for c in saved if c.tokens <= window["start_tokens"]]
    after = [c for c in saved if c.tokens >= window["end_tokens"]]
    if before:
        out["before"] = before[-1]
    out["during"] = min(saved, key=lambda c: abs(np.log(max(c.tokens, 1)) - np.log(window["steepest_tokens"])))
    if after:
        out["after"] = after[0]
    return out


def probe_inputs(run: Run):
    """(probe sequence, held-out sequence) [n] of a run: its first prefix-matching probe and the
    held-out sequence with the most repeated tokens (Run.probes: as training built them)."""
    import torch

    probes = run.probes()
    held = probes.heldout
    repeats = torch.tensor([len(s) - len(set(s.tolist())) for s in held])
    return probes.repeated[0], held[int(repeats.argmax())]


VISIBLE = {"\n": "\u23ce", "\t": "\u21e5", " ": "\u00b7"}  # newline, tab, space as visible marks


def token_labels(run: Run, ids: list[int]) -> list[str] | None:
    """Text runs: each token id as its text (BOS, the end-of-document id as <eod>, newlines, tabs
    and spaces as visible marks); None for runs without a tokenizer."""
    if run.tokenizer_dir is None:
        return None
    from train.core.text import TextTokenizer

    tok = TextTokenizer.load(run.tokenizer_dir)
    out = []
    for t in ids:
        text = "BOS" if t == 0 else "<eod>" if t == tok.eod else tok.decode([t])
        out.append("".join(VISIBLE.get(c, c) for c in text) if t and t != tok.eod else text)
    return out


def head_scales(patterns: dict[str, dict[str, list]], heads: list[str]) -> dict[str, float]:
    """Per head: the largest attention weight off the BOS column (key 0) over the moments, at
    least 0.05: the top of its colour scale."""
    return {h: max(0.05, max(float(np.max(np.array(patterns[m][h])[:, 1:], initial=0.0)) for m in patterns))
            for h in heads}


def collect(run: Run, result: dict[str, Any]) -> dict[str, Any] | None:
    """Patterns of the induction heads and partners at before/during/after, on both inputs:
    {"heads": [...], "moments": {moment: tokens}, "inputs": {name: {"tokens": [...],
    "patterns": {moment: {head: [[...]]}}, "labels": [...] or None, "scale": {head: top}}},
    "moment_labels": {moment: "1.25M"}}; None without a window, heads or saved weights."""
    import torch

    from train.core.metrics import attention_patterns

    window = result.get("window")
    if not window or not result.get("induction_heads") or not run.rows:
        return None
    checkpoints = moment_checkpoints(run, window)
    if not checkpoints:
        return None
    heads: list[str] = []
    for head in result["induction_heads"]:
        for name in (head, partner(run.rows[-1], head)):
            if name and name not in heads:
                heads.append(name)
    probe, heldout = probe_inputs(run)
    out = {"heads": heads, "partners": {h: partner(run.rows[-1], h) for h in result["induction_heads"]},
           "moments": {}, "moment_labels": {},
           "inputs": {name: {"tokens": seq.tolist(), "patterns": {}, "labels": token_labels(run, seq.tolist())}
                      for name, seq in (("probe", probe), ("held-out", heldout))}}
    for moment, checkpoint in checkpoints.items():
        model, _ = run.load_model(checkpoint)
        out["moments"][moment] = checkpoint.tokens
        out["moment_labels"][moment] = fmt_tokens(checkpoint.tokens)
        for name, seq in (("probe", probe), ("held-out", heldout)):
            with torch.no_grad():
                pats = attention_patterns(model, seq[None])[:, 0]  # [n_layers, n_heads, q, k]
            out["inputs"][name]["patterns"][moment] = {
                h: np.round(pats[N.parse_head_name(h)].numpy(), 3).tolist() for h in heads}
    for data in out["inputs"].values():
        data["scale"] = head_scales(data["patterns"], heads)
    return out


def figure(data: dict[str, Any], input_name: str):
    """Static figure: one row per head, one column per moment, A[query, key] as an image, the
    colours from 0 to the head's scale (BOS column clipped), a colour bar per head."""
    from analysis.plots import plt

    moments = [m for m in MOMENTS if m in data["moments"]]
    heads = data["heads"]
    inp = data["inputs"][input_name]
    fig, axes = plt.subplots(len(heads), len(moments), figsize=(3.2 * len(moments) + 0.8, 3.0 * len(heads)),
                             squeeze=False, constrained_layout=True)
    for i, head in enumerate(heads):
        for j, moment in enumerate(moments):
            ax = axes[i, j]
            im = ax.imshow(np.array(inp["patterns"][moment][head]), cmap="viridis", vmin=0, vmax=inp["scale"][head])
            role = "induction" if head in data["partners"] else "previous-token"
            ax.set_title(f"{head} ({role}), {moment}\n{fmt_tokens(data['moments'][moment])} tokens", fontsize=9)
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
            ax.tick_params(labelsize=7)
        bar = fig.colorbar(im, ax=axes[i, :].tolist(), shrink=0.85)
        bar.set_label(f"attention (BOS column clipped at {inp['scale'][head]:.2f})", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"attention patterns on the {input_name} sequence", fontsize=11)
    return fig


VIEW_JS = """
(function(){const d=DATA,root=document.getElementById(ROOT);
function render(input){const box=root.querySelector('.pv-body');box.innerHTML='';
 const inp=d.inputs[input],seq=inp.tokens,rows=[];
 const token=(t,i)=>inp.labels?inp.labels[i]:(t===0?'BOS':String(t));
 for(const m of Object.keys(d.moments))for(const h of d.heads)rows.push([m,h]);
 const spans=[];
 for(const [m,h] of rows){const line=document.createElement('div');line.className='pv-row';
  const lab=document.createElement('span');lab.className='pv-lab';lab.textContent=h+' '+m+' '+d.moment_labels[m];
  lab.title=h+', '+m+' the window, '+d.moments[m].toLocaleString()+' tokens; full colour at '+inp.scale[h];
  line.appendChild(lab);const own=[];
  seq.forEach((t,i)=>{const s=document.createElement('span');s.className='pv-tok';s.textContent=token(t,i);
   s.dataset.i=i;line.appendChild(s);own.push(s);});spans.push([m,h,own]);box.appendChild(line);}
 function show(q){for(const [m,h,own] of spans){const a=inp.patterns[m][h][q],top=inp.scale[h];
  own.forEach((s,k)=>{const w=k<=q?a[k]:0;s.style.background='rgba(220,80,0,'+Math.min(w/top,1).toFixed(3)+')';
   s.style.outline=k===q?'2px solid #06c':'none';s.title='attention '+w.toFixed(3);});}}
 box.querySelectorAll('.pv-tok').forEach(s=>s.addEventListener('mouseenter',()=>show(+s.dataset.i)));
 show(seq.length-1);}
root.querySelectorAll('input[type=radio]').forEach(r=>r.addEventListener('change',()=>render(r.value)));
render('probe');})();
"""

VIEW_CSS = """.pv-row{white-space:nowrap;font:11px monospace;margin:1px 0}
.pv-lab{position:sticky;left:0;z-index:1;background:#fff;display:inline-block;width:13em;overflow:hidden;
text-overflow:ellipsis;vertical-align:bottom;border-right:1px solid #999;margin-right:3px}
.pv-tok{display:inline-block;min-width:1.2em;padding:0 1px;text-align:center;border-right:1px solid #eee;cursor:default;
white-space:pre}
.pv{overflow-x:auto;border:1px solid #ddd;padding:.4em;margin:.5em 0}"""


def interactive_view(data: dict[str, Any], element_id: str) -> str:
    """A self-contained HTML fragment (no external resources): hover a token to see, for every
    head and moment, where the head attends from it (orange: attention weight)."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    js = VIEW_JS.replace("DATA", payload).replace("ROOT", json.dumps(element_id))
    eid = html.escape(element_id)
    return (f"<style>{VIEW_CSS}</style><div class='pv' id='{eid}'><p>Hover a token: each row shows that "
            f"head's attention from the hovered token (query, outlined) to earlier tokens (keys), at a "
            f"checkpoint before, during and after the window. Orange: attention weight, full colour at the "
            f"head's largest weight off the BOS column (BOS itself often takes more: hover a token for its "
            f"exact weight). Input: "
            f"<label><input type='radio' name='{eid}' value='probe' checked> probe</label> "
            f"<label><input type='radio' name='{eid}' value='held-out'> held-out sequence</label></p>"
            f"<div class='pv-body'></div></div><script>{js}</script>")


def attention_section(run: Run, result: dict[str, Any], fig_dir: Path, element_id: str) -> tuple[dict[str, Path], str]:
    """Figures (name -> PNG path) and the interactive view of a run; ({}, "") when there is nothing to show."""
    from analysis.plots import plt

    data = collect(run, result)
    if data is None:
        return {}, ""
    figs = {}
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name in data["inputs"]:
        fig = figure(data, name)
        path = fig_dir / f"attention_{name.replace('-', '')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        figs[f"attention_{name.replace('-', '')}"] = path
    return figs, "<h3>Attention patterns (interactive)</h3>" + interactive_view(data, element_id)
