"""The report's explanation of each verdict: what was compared and against which threshold, in
words, from the detector's result (train/core/phase.py) and the stages (analysis/stages.py).
Plain text lines; the report escapes them."""
from __future__ import annotations

from typing import Any

from train.core.phase import NO, STILL_RISING, TOO_SHORT, YES, fmt_tokens

VERDICT_WORDS = {YES: "yes", NO: "no", STILL_RISING: "still rising at the end", TOO_SHORT: "too short to tell"}


def verdict(result: dict[str, Any]) -> str:
    """The run's verdict (results of older versions carry none: yes or no)."""
    return result.get("verdict") or (YES if result.get("phase_change") else NO)


def _span(w: dict[str, Any]) -> str:
    return (f"{fmt_tokens(w['start_tokens'])} to {fmt_tokens(w['end_tokens'])} tokens "
            f"(steepest {fmt_tokens(w['steepest_tokens'])})")


def _state(w: dict[str, Any], found: str) -> str:
    if w.get("detected"):
        return f"found: {found}, {_span(w)}"
    if w.get("unfinished"):
        return f"under way at the last checkpoint: {found}, from {fmt_tokens(w['start_tokens'])} tokens"
    return f"not found ({w.get('reason', '')})"


def _heads(result: dict[str, Any], p: dict[str, Any]) -> str:
    heads = result.get("prefix_matching") or {}
    rising = {k: w for k, w in heads.items() if w.get("detected")}
    if rising:
        parts = [f"{k} +{w['size']:.2f} to {w['value_after']:.2f}" + (" (still rising at the end)"
                                                                      if w.get("unfinished") else "")
                 for k, w in sorted(rising.items())]
        return "found: " + "; ".join(parts)
    if not heads:
        return "not measured (no prefix_matching keys)"
    name, best = max(heads.items(), key=lambda kw: kw[1].get("size") or 0.0)
    return f"none (largest change: {name} {best.get('size') or 0.0:+.2f}; {best.get('reason', '')})"


def phase_lines(result: dict[str, Any]) -> list[str]:
    """Why the run got its verdict: each signal with its threshold, whether they coincide, the rule."""
    p = result.get("params") or {}
    co = result.get("coincide") or {}
    v = verdict(result)
    lines = [
        f"ICL jump (the ICL score falls by >= {p.get('icl_min_jump', 0.2):g} nats after the burn-in, "
        f">= {p.get('min_snr', 6):g} x its noise, concentrated >= {p.get('min_concentration', 2):g}x, and ends "
        f"before the run): " + _state(result["icl_jump"], f"a fall of {result['icl_jump']['size']:.2f} nats"),
        f"loss bump (the held-out loss falls >= {p.get('bump_min_nats', 0.05):g} nats below its earlier trend in "
        f"ln tokens, >= {p.get('min_snr', 6):g} x its noise): "
        + _state(result["loss_bump"], f"{result['loss_bump']['size']:.2f} nats"),
        f"prefix-matching rises (a head rises >= {p.get('pm_min_rise', 0.1):g} to >= "
        f"{p.get('pm_min_level', 0.15):g}): " + _heads(result, p),
        "coinciding (windows widened by {:g} ln tokens overlap): ICL jump and loss bump {}; ICL jump and a "
        "rise {}; loss bump and a rise {}".format(p.get("coincide_tol", 0.1), *(
            "yes" if co.get(k) else "no" for k in ("icl_bump", "icl_prefix_matching", "bump_prefix_matching"))),
        f"rule: 'yes' when the ICL jump ({result.get('icl_key', 'icl_score')}) coincides with a prefix-matching "
        "rise or with the loss bump, each window ending before the run's last checkpoint",
    ]
    if v == STILL_RISING:
        w = result["unfinished_window"]
        lines.append(f"the coinciding changes run from {fmt_tokens(w['start_tokens'])} tokens to the last "
                     f"checkpoint ({fmt_tokens(w['end_tokens'])}): train longer to see the window end")
    elif v == TOO_SHORT:
        lines.append(result["message"])
    return lines


def stage_lines(stages: dict[str, Any]) -> list[str]:
    """What 'previous-token heads before induction' compared, and its threshold."""
    order = stages.get("order") or {}
    ref = {"prefix_matching": f"the prefix-matching rise of {stages['induction'].get('prefix_matching_head')}",
           "phase_change": "the phase-change window"}.get(order.get("reference"), "an induction rise (none found)")
    pt = stages.get("previous_token") or {}
    heads = ", ".join(pt.get("heads") or []) or "none"
    return [f"compared: the rise of the largest layer-0 previous-token score (heads {heads}) with {ref}; "
            f"'yes' needs its steepest point earlier and its start no later",
            f"found: {order.get('message', '')}"]
