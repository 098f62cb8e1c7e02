"""wandb in offline mode: the run's history holds the per-head prefix-matching keys, with tokens
seen as the x-axis, and a heatmap image per checkpoint."""
import pytest

from tests.wandb_files import read_offline_history
from tests.helpers import train_run
from train.rundir import read_metrics


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    import os

    os.environ["WANDB_MODE"] = "offline"
    run_dir = tmp_path_factory.mktemp("wandb_run")
    return train_run(run_dir, ["experiment=smoke", "device=cpu", "logger=wandb", "logger.mode=offline",
                               "train.total_tokens=80000"])


def test_offline_history_has_prefix_matching_keys(wandb_run):
    history = read_offline_history(wandb_run / "wandb")
    rows = read_metrics(wandb_run / "metrics.jsonl")
    assert len(history) == len(rows) >= 5
    keys = set(history[-1])
    assert {"prefix_matching/L1H0", "prefix_matching/L0H3", "copying/L1H2", "icl_score", "tokens"} <= keys
    assert [h["tokens"] for h in history] == [r["tokens"] for r in rows]
    assert history[-1]["prefix_matching/L1H0"] == pytest.approx(rows[-1]["prefix_matching/L1H0"])
    assert "heads/prefix_matching/_type" in keys  # the heads x layers heatmap image


def test_offline_run_is_finished(wandb_run):
    from wandb.proto import wandb_internal_pb2 as pb

    from tests.wandb_files import _payloads, find_run_file

    kinds = []
    for payload in _payloads(find_run_file(wandb_run / "wandb").read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kinds.append(record.WhichOneof("record_type"))
    assert "exit" in kinds  # run.finish() was called
