"""Metric names: the one place that builds and parses the keys of a metrics row.

Key format (definitions of every metric: docs/METRICS.md):

    name                          a scalar or list ("loss/heldout", "icl_score", "per_position_loss")
    name/L{layer}H{head}          one value per head ("prefix_matching/L1H3")
    name/L{l2}H{h2}/L{l1}H{h1}    one value per head pair, the later head first ("k_composition/L1H2/L0H3")
    name/{part}                   one value per named part ("composition_baseline/k", "induction_heads/both")

Callbacks return their results as values keyed by metric name (tensors, dicts, numbers, lists);
`flatten` turns those into row keys, once, at every checkpoint:

    tensor [n_layers, n_heads]       -> name/L{l}H{h}; bool tensors give 0/1 ints; NaN (undefined) is left out
    {(l2, l1): tensor [h2, h1]}      -> name/L{l2}H{h2}/L{l1}H{h1}
    {"part": value}                  -> name/part
    1-D tensor                       -> a list rounded to VECTOR_DECIMALS decimals
    0-d tensor, number, str, list    -> as they are
"""
from __future__ import annotations

import math
import re
from typing import Any

# -- names of the row's keys ------------------------------------------------------------------
STEP, TOKENS, LR = "step", "tokens", "lr"
LOSS_TRAIN, LOSS_HELDOUT = "loss/train", "loss/heldout"
PER_POSITION_LOSS, ICL_SCORE, ICL_EARLY, ICL_LATE = "per_position_loss", "icl_score", "icl_early", "icl_late"
ICL_SCORE_SE = "icl_score_se"
# the same on held-out sequences with the training repetition applied (data.repeat.p > 0)
LOSS_HELDOUT_MIXTURE, ICL_SCORE_MIXTURE = "loss/heldout_mixture", "icl_score_mixture"
EVENT = "event"  # a row that records a fault instead of a checkpoint
NONFINITE, DIVERGENCE = "nonfinite", "divergence"  # its values: a non-finite loss or gradient; the divergence guard
ELAPSED = "time/elapsed_s"  # loggers only (wall clock is not part of metrics.jsonl)
HEATMAP = "heads/prefix_matching"  # wandb only: the layers x heads image of prefix matching
OVERVIEW, CHARTS = "overview", "charts"  # wandb only: sections of the key scalars and of the per-family charts
PHASE_CHANGE = "phase_change"  # wandb run summary only: the detected window (train/live.py)
# checkpoint.adaptive only: why the checkpoint was taken ("base" or "zoom") and the watch behind it
# (train/core/schedules.py Decision): the watched value that moved most for its threshold (a head
# name, or loss/train), its change since the previous checkpoint, and that threshold
CHECKPOINT_REASON, WATCH_CHANNEL = "checkpoint/reason", "checkpoint/watch"
WATCH_CHANGE, WATCH_THRESHOLD = "checkpoint/watch_change", "checkpoint/watch_threshold"

# per-head metrics
PREFIX_MATCHING, DUPLICATE_TOKEN, PREVIOUS_TOKEN, COPYING = (
    "prefix_matching", "duplicate_token", "previous_token", "copying")
OV_COPYING, QK_PREFIX_MATCHING = "ov_copying", "qk_prefix_matching"
PREFIX_MATCHING_MIN, PREFIX_MATCHING_MAX, PROBE_FRAGILE = "prefix_matching_min", "prefix_matching_max", "probe_fragile"
IS_BEHAVIORAL, IS_MECHANISTIC, K_COMPOSITION_PREV_TOKEN = "is_behavioral", "is_mechanistic", "k_composition_prev_token"

# named parts
COMPOSITION_BASELINE, INDUCTION_THRESHOLDS, INDUCTION_HEADS = (
    "composition_baseline", "induction_thresholds", "induction_heads")
# ... the parts of induction_heads: counts of heads, and lists of head names
BEHAVIORAL, MECHANISTIC, BOTH, DISAGREE = "behavioral", "mechanistic", "both", "disagree"
DISAGREEING, BOTH_HEADS = "disagreeing", "both_heads"
PREVIOUS_TOKEN_HEADS = "previous_token_heads"  # a list of head names
ABLATION, REPEAT_LOSS = "ablation", "repeat_loss"
LLC = "llc"  # local learning coefficient: its named parts (train/core/llc.py)
# causal scores (train/core/causal.py): per head, per head pair (path_patching), named parts
ACTIVATION_PATCHING, CAUSAL_K_SHARE, IS_CAUSAL = "activation_patching", "causal_k_share", "is_causal"
CAUSAL_THRESHOLDS, ATTRIBUTION_AGREEMENT = "causal_thresholds", "attribution_agreement"
# the out-of-distribution suite (train/core/ood.py): the clean loss per set (a part per set), and
# which earlier copy a head follows on the conflict set
OOD_LOSS, OOD_CONFLICT_RECENT = "ood_loss", "ood_conflict_recent"

VECTOR_DECIMALS = 5

_HEAD = re.compile(r"^L(?P<layer>\d+)H(?P<head>\d+)$")
_HEAD_KEY = re.compile(r"^(?P<metric>[^/]+)/L(?P<layer>\d+)H(?P<head>\d+)$")
_FAMILY_KEY = re.compile(r"^(?P<metric>[^/]+)/(?P<member>L\d+H\d+(/L\d+H\d+)?)$")


def composition(kind: str) -> str:
    """The metric name of a composition score: "q" -> "q_composition"."""
    return f"{kind}_composition"


def prefix_matching_variant(variant: str) -> str:
    """The metric name of prefix matching on a probe variant: "p8x7" -> "prefix_matching_p8x7"."""
    return f"{PREFIX_MATCHING}_{variant}"


def ood_prefix_matching(ood_set: str) -> str:
    """Prefix matching on an out-of-distribution set: "short" -> "ood_prefix_matching_short"."""
    return f"ood_prefix_matching_{ood_set}"


def ood_ablation(kind: str, ood_set: str) -> str:
    """A head's ablation effect on an out-of-distribution set: "mean", "short" -> "ood_ablation_mean_short"."""
    return f"ood_ablation_{kind}_{ood_set}"


def parse_ood_ablation(metric: str) -> tuple[str, str] | None:
    """"ood_ablation_mean_short" -> ("mean", "short"); None for any other metric name."""
    m = re.match(r"^ood_ablation_(zero|mean)_(.+)$", metric)
    return None if m is None else (m[1], m[2])


def ablated(metric: str, kind: str) -> str:
    """"icl_score", "zero" -> "icl_score_zero_ablated"."""
    return f"{metric}_{kind}_ablated"


def icl_removed(kind: str) -> str:
    return f"icl_removed_{kind}"


def of_induction_heads(metric: str) -> str:
    """The same ablation metric with all heads labelled both ablated together (a part of ABLATION):
    "icl_score_zero_ablated" -> "icl_score_zero_induction_heads", "icl_removed_zero" ->
    "icl_removed_zero_induction_heads"."""
    return metric.removesuffix("_ablated") + "_induction_heads"


def path_patching(measure: str, kind: str) -> str:
    """A path-patching metric: "attention" (or "logit"), "k" (or "q", "v") -> "path_patching_attention_k"."""
    return f"path_patching_{measure}_{kind}"


def attribution(metric: str) -> str:
    """Its attribution-patching estimate: "activation_patching" -> "attribution_activation_patching"."""
    return f"attribution_{metric}"


def part_key(name: str, part: str) -> str:
    """"induction_heads", "both" -> "induction_heads/both"."""
    return f"{name}/{part}"


# -- heads --------------------------------------------------------------------------------------
def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head_name(name: str) -> tuple[int, int]:
    """"L1H3" -> (1, 3)."""
    m = _HEAD.match(name)
    if m is None:
        raise ValueError(f"not a head name (L<layer>H<head>): {name!r}")
    return int(m["layer"]), int(m["head"])


def head_key(metric: str, layer: int, head: int) -> str:
    return f"{metric}/{head_name(layer, head)}"


def pair_key(metric: str, later: tuple[int, int], earlier: tuple[int, int]) -> str:
    return f"{metric}/{head_name(*later)}/{head_name(*earlier)}"


def parse_head_key(key: str) -> tuple[str, int, int] | None:
    """"prefix_matching/L1H3" -> ("prefix_matching", 1, 3); None for any other key."""
    m = _HEAD_KEY.match(key)
    return None if m is None else (m["metric"], int(m["layer"]), int(m["head"]))


def parse_family_key(key: str) -> tuple[str, str] | None:
    """A per-head or per-pair key split into its metric and its head (or head pair):
    "prefix_matching/L1H3" -> ("prefix_matching", "L1H3"), "k_composition/L1H2/L0H3" ->
    ("k_composition", "L1H2/L0H3"); None for any other key."""
    m = _FAMILY_KEY.match(key)
    return None if m is None else (m["metric"], m["member"])


def overview_key(key: str) -> str:
    """A row key repeated in the first wandb section: "loss/heldout" -> "overview/loss_heldout"."""
    return f"{OVERVIEW}/{key.replace('/', '_')}"


def overview_layer_max_key(metric: str, layer: int) -> str:
    """The largest per-head score of a layer in the first wandb section: "overview/max_{metric}_L{layer}"."""
    return f"{OVERVIEW}/max_{metric}_L{layer}"


def phase_change_key(part: str) -> str:
    """A run-summary entry of the detected phase change: "phase_change/{part}"."""
    return f"{PHASE_CHANGE}/{part}"


def chart_key(metric: str) -> str:
    """The wandb chart of a whole per-head (or per-pair) family: "charts/{metric}"."""
    return f"{CHARTS}/{metric}"


def heads_in(keys, metric: str) -> list[tuple[int, int]]:
    """Sorted (layer, head) of the per-head keys of `metric` among `keys`."""
    found = {(p[1], p[2]) for k in keys if (p := parse_head_key(k)) is not None and p[0] == metric}
    return sorted(found)


def head_table(row: dict[str, Any], metric: str) -> list[list[Any]] | None:
    """[n_layers][n_heads] values of a per-head metric in one row (NaN where a head has none),
    or None if the row has no key of it."""
    heads = heads_in(row, metric)
    if not heads:
        return None
    n_layers, n_heads = 1 + max(l for l, _ in heads), 1 + max(h for _, h in heads)
    return [[row.get(head_key(metric, l, h), float("nan")) for h in range(n_heads)] for l in range(n_layers)]


# -- results -> row -------------------------------------------------------------------------------
def flatten(results: dict[str, Any]) -> dict[str, Any]:
    """Row keys of a callback's results (rules in the module docstring), in the results' order."""
    row: dict[str, Any] = {}
    for name, value in results.items():
        row |= _flatten_one(name, value)
    return row


def _flatten_one(name: str, value: Any) -> dict[str, Any]:
    import torch  # here, not at the top: code that only reads rows (analysis) needs no torch

    if isinstance(value, torch.Tensor):
        if value.dim() == 2:
            return _per_head(name, value, value.dtype == torch.bool)
        if value.dim() == 1:
            return {name: [round(x, VECTOR_DECIMALS) for x in value.tolist()]}
        if value.dim() == 0:
            return {name: value.item()}
        raise ValueError(f"cannot log a {value.dim()}-D tensor as {name!r}")
    if isinstance(value, dict):
        if all(isinstance(k, tuple) for k in value):
            return _per_pair(name, value)
        out: dict[str, Any] = {}
        for part, v in value.items():
            out |= _flatten_one(part_key(name, part), v)
        return out
    return {name: value}


def _per_head(name: str, table, as_int: bool) -> dict[str, Any]:
    values = table.float().tolist() if as_int else table.tolist()
    out: dict[str, Any] = {}
    for l, row in enumerate(values):
        for h, v in enumerate(row):
            if isinstance(v, float) and math.isnan(v):
                continue  # undefined for this head
            out[head_key(name, l, h)] = int(v) if as_int else float(v)
    return out


def _per_pair(name: str, pairs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (l2, l1), table in pairs.items():
        for h2, values in enumerate(table.tolist()):
            for h1, v in enumerate(values):
                out[pair_key(name, (l2, h2), (l1, h1))] = v
    return out
