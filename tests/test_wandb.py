"""wandb in offline mode: the run's history holds the per-head prefix-matching keys, with tokens
seen as the x-axis, and a heatmap image per checkpoint."""
import pytest

from tests.wandb_files import read_offline_history
from tests.helpers import train_run
from tests.presets import WANDB_OFFLINE
from train.core.rundir import read_metrics


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    import os

    os.environ["WANDB_MODE"] = "offline"
    run_dir = tmp_path_factory.mktemp("wandb_run")
    return train_run(run_dir, WANDB_OFFLINE)


@pytest.mark.slow
def test_offline_history_has_prefix_matching_keys(wandb_run):
    history = [h for h in read_offline_history(wandb_run / "wandb") if "step" in h]  # not the final charts
    rows = read_metrics(wandb_run / "metrics.jsonl")
    assert len(history) == len(rows) >= 5
    keys = set(history[-1])
    assert {"prefix_matching/L1H0", "prefix_matching/L0H3", "copying/L1H2", "icl_score", "tokens"} <= keys
    assert [h["tokens"] for h in history] == [r["tokens"] for r in rows]
    assert history[-1]["prefix_matching/L1H0"] == pytest.approx(rows[-1]["prefix_matching/L1H0"])
    assert "heads/prefix_matching/_type" in keys  # the heads x layers heatmap image


@pytest.mark.slow
def test_offline_run_is_finished(wandb_run):
    from wandb.proto import wandb_internal_pb2 as pb

    from tests.wandb_files import _payloads, find_run_file

    kinds = []
    for payload in _payloads(find_run_file(wandb_run / "wandb").read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kinds.append(record.WhichOneof("record_type"))
    assert "exit" in kinds  # run.finish() was called


@pytest.mark.slow
def test_workspace_reads_well(wandb_run):
    """What the workspace shows: key scalars in the overview section, one chart per per-head
    family with every head a line (the single per-head keys get no panel), and the final detection
    in the run summary."""
    import json

    from tests.wandb_files import hidden_metrics, read_offline_summary

    history, rows = read_offline_history(wandb_run / "wandb"), read_metrics(wandb_run / "metrics.jsonl")
    last = rows[-1]
    assert history[-2]["overview/loss_heldout"] == pytest.approx(last["loss/heldout"])
    assert history[-2]["overview/max_prefix_matching_L1"] == pytest.approx(
        max(v for k, v in last.items() if k.startswith("prefix_matching/L1H")))
    hidden = hidden_metrics(wandb_run / "wandb")
    assert {"prefix_matching/L1H0", "copying/L0H3", "k_composition/L1H2/L0H3"} <= hidden
    assert not any(k.startswith("overview/") or k == "loss/heldout" for k in hidden)
    charts = history[-1]  # logged once more at the end, on all rows
    assert charts["charts/prefix_matching_table/_type"] == "table-file"
    table = json.loads(next((wandb_run / "wandb").rglob("prefix_matching_table_*.table.json")).read_text())
    lines = {row[1] for row in table["data"]}
    assert lines == {f"L{l}H{h}" for l in range(2) for h in range(4)}  # every head is a line
    assert len(table["data"]) == 8 * len(rows)  # every checkpoint of every head
    summary = read_offline_summary(wandb_run / "wandb")
    assert summary["phase_change/detected"] is False  # 80k tokens: far too early for induction heads
    assert summary["phase_change/verdict"] == "too short to tell" and summary["phase_change/provisional"] is True
    assert summary["phase_change/message"].startswith("too short to tell: at the last checkpoint")
