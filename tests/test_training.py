import pytest
"""Real CPU training: a 2-layer model forms induction heads, a 1-layer model does not."""
from train.core.names import head_table
from train.core.rundir import read_metrics


def _last_layer_max(row, metric="prefix_matching"):
    return max(head_table(row, metric)[-1])


@pytest.mark.slow
def test_two_layers_form_an_induction_head(two_layer_run):
    rows = read_metrics(two_layer_run / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    assert _last_layer_max(first) < 0.2
    assert _last_layer_max(last) > 0.5
    # the ICL score falls (the model starts using its context) ...
    assert last["icl_score"] < first["icl_score"] - 0.5
    # ... and the held-out loss improves a lot
    assert last["loss/heldout"] < first["loss/heldout"] - 1.5


@pytest.mark.slow
def test_one_layer_forms_none(one_layer_run):
    rows = read_metrics(one_layer_run / "metrics.jsonl")
    assert max(_last_layer_max(r) for r in rows) < 0.2
