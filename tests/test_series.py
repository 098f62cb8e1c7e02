"""Export to transformers / TransformerLens and induction-head scores over checkpoint series.

The cross-implementation tests: a short run, exported checkpoint by checkpoint in the project's
own layout and scored by analysis.series on the export's probes, gives the run's own rows exactly
(the same code on the same weights); exported as GPT-2 (transformers' own GPT-2 code computes the
patterns and losses) it gives them within float rounding and the same phase-change verdict.
Series of tiny random models of other families get every score where the model adapter maps them
(tests/test_adapter.py), the behavioural ones elsewhere."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from train.core.phase import PhaseParams
from analysis.report import analyze_run
from train.core.runs import load_run
from analysis import series as S
from analysis.series_source import hub_revisions
from analysis import export as E
from train.core import names as N
from train.core import probes as P
from train.core import rundir
from train.core.checkpoint import save_checkpoint
from analysis.export import export_run
from train.core.model import AttnOnlyTransformer
from train.core.rundir import read_metrics
from train.core.hf_model import register_project_model
from tests.helpers import compose_config, one_line_error, train_run
from tests.presets import SERIES_RUN

PER_HEAD = (N.PREFIX_MATCHING, N.PREVIOUS_TOKEN, N.DUPLICATE_TOKEN, N.COPYING, N.OV_COPYING)
NOT_SCORED = (N.LR, "loss/train")  # training's own row keys


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("run") / "run", SERIES_RUN)


def fake_run(root: Path, overrides: list[str], seed: int = 0) -> tuple[Path, AttnOnlyTransformer]:
    """A run directory with one checkpoint of a randomly initialised model whose biases, LayerNorm
    parameters and smearing are random too (so that every parameter matters)."""
    cfg = compose_config(["logger=none", "probes.n_heldout=8", "probes.n_probes=4", *overrides])
    saved = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(**{k: v for k, v in saved["model"].items() if k != "_target_"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_U")):
                p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(root, model, {"step": 7, "tokens": 7 * 4096, "kind": "scheduled", "model": saved["model"],
                                  "config": saved})
    return root, model.eval()


def run_probes(run: Path) -> P.Probes:
    """The probes a run's saved config builds (with the probe token set)."""
    from train.core.runs import Run

    return Run(run).probes()


def tokens(vocab: int = 64, n: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


# -- the cross-implementation tests ------------------------------------------------------------
@pytest.mark.slow
def test_exported_series_gives_the_runs_own_rows(tiny_run, tmp_path):
    """The project's layout is the project's model: every key the run logged, bit for bit, from the
    export's own probe file (no --probes): the ablations at the same checkpoints, and the
    robustness variants drawn from the export's probe token set as training drew them."""
    export_run(tiny_run, tmp_path / "export", all_steps=True)
    lines: list[str] = []
    rows = S.run_series(str(tmp_path / "export"), tmp_path / "series", S.Options(), log=lines.append)
    run_rows = {r[N.STEP]: r for r in read_metrics(tiny_run) if N.EVENT not in r}
    assert [r[N.STEP] for r in rows] == sorted(run_rows) and len(rows) >= 7
    for row in rows:
        theirs = {k: v for k, v in run_rows[row[N.STEP]].items() if not k.startswith(NOT_SCORED)}
        assert {k: row.get(k) for k in theirs} == theirs, row[N.STEP]
    assert N.head_key(N.ablated(N.ICL_SCORE, "zero"), 1, 0) in rows[0]
    assert N.head_key(N.prefix_matching_variant("p8x7"), 1, 0) in rows[0]
    assert not [line for line in lines if line.startswith("note:")]  # nothing was left out


@pytest.mark.slow
def test_gpt2_export_series_reproduces_the_runs_scores_and_window(tiny_run, tmp_path):
    export_run(tiny_run, tmp_path / "export", "hf", "gpt2", all_steps=True)
    assert (tmp_path / "export" / "step_0000000" / P.PROBES_FILE).is_file()
    out = tmp_path / "series"
    opts = S.Options(probes=tmp_path / "export" / "step_0000000", callbacks=["attention", "copying", "heldout", "circuits"])
    rows = S.run_series(str(tmp_path / "export"), out, opts, log=lambda m: None)
    run_rows = {r[N.STEP]: r for r in read_metrics(tiny_run) if N.EVENT not in r}
    assert [r[N.STEP] for r in rows] == sorted(run_rows) and len(rows) >= 7
    worst = {}
    for row in rows:
        theirs = run_rows[row[N.STEP]]
        assert row[N.TOKENS] == theirs[N.TOKENS]
        for key, value in row.items():
            if key in theirs and key != N.PER_POSITION_LOSS and isinstance(value, float):
                worst[key.split("/")[0]] = max(worst.get(key.split("/")[0], 0.0), abs(value - theirs[key]))
        diff = torch.tensor(row[N.PER_POSITION_LOSS]) - torch.tensor(theirs[N.PER_POSITION_LOSS])
        worst[N.PER_POSITION_LOSS] = max(worst.get(N.PER_POSITION_LOSS, 0.0), diff.abs().max().item())
    assert set(worst) >= {*PER_HEAD, N.PER_POSITION_LOSS, N.QK_PREFIX_MATCHING, N.composition("k")}
    assert max(worst.values()) < 1e-4, worst
    # The scores move over training (so agreeing is not trivial) ...
    first, last = run_rows[min(run_rows)], run_rows[max(run_rows)]
    assert abs(first[N.LOSS_HELDOUT] - last[N.LOSS_HELDOUT]) > 0.5
    # ... and the analysis reads the series' rows unchanged and reaches the run's verdict.
    ours, theirs = analyze_run(load_run(out), PhaseParams()), analyze_run(load_run(tiny_run), PhaseParams())
    for key in ("phase_change", "induction_heads", "window"):
        assert ours.get(key) == theirs.get(key), key
    # Resume: nothing left to do.
    assert S.run_series(str(tmp_path / "export"), out, opts, log=lambda m: None) == []


@pytest.mark.slow
def test_native_export_loads_without_the_project(tiny_run, tmp_path):
    """The project's own model type loads with trust_remote_code from the export alone (the
    package `train` made unimportable) and gives the project's logits."""
    from train.core.checkpoint import load_model

    out = export_run(tiny_run, tmp_path / "native")[0]
    model, _ = load_model(rundir.list_checkpoints(tiny_run)[-1])
    x = tokens()
    torch.save({"x": x, "logits": model(x).logits}, tmp_path / "ref.pt")
    code = ("import sys, torch; sys.modules['train'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
            "out = m(ref['x'], output_attentions=True)\n"
            "assert len(out.attentions) == m.config.n_layers\n"
            "print((out.logits - ref['logits']).abs().max().item())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-4


@pytest.mark.parametrize("layout,overrides", [("native", ["model.smeared_keys=true", "model.positional=shortformer"]),
                                              ("native", ["model.layernorm=false", "model.positional=rotary"]),
                                              ("neox", ["model.positional=rotary", "model.rotary_base=500"]),
                                              ("gpt2", [])])
def test_hf_exports_give_the_projects_logits(tmp_path, layout, overrides):
    from transformers import AutoModelForCausalLM

    register_project_model()
    run, model = fake_run(tmp_path / "run", overrides)
    out = export_run(run, tmp_path / "out", "hf", layout)[0]
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    x = tokens()
    ours = model(x, return_patterns=True)
    theirs = hf(x, output_attentions=True)
    assert (theirs.logits - ours.logits).abs().max() < 1e-4
    assert (torch.stack(theirs.attentions) - torch.stack(ours.patterns)).abs().max() < 1e-5


@pytest.mark.parametrize("layout,overrides,reason", [
    ("gpt2", ["model.positional=rotary"], "rotary positions"),
    ("gpt2", ["model.smeared_keys=true"], "smeared keys"),
    ("neox", ["model.layernorm=false", "model.positional=rotary"], "no LayerNorm"),
    ("gpt2", ["model.d_model=32", "model.d_head=8"], "output bias"),
])
def test_inexact_standard_layouts_are_refused_in_one_line(tmp_path, capsys, layout, overrides, reason):
    run, _ = fake_run(tmp_path / "run", overrides)
    assert E.main([str(run), "--layout", layout, "--out", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert reason in line and "--layout native" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")  # 3.x says so
def test_transformer_lens_export_gives_the_projects_logits(tmp_path):
    tl = pytest.importorskip("transformer_lens")  # the transformer-lens extra (installed in CI)
    import json

    from safetensors.torch import load_file

    for i, overrides in enumerate((["model.positional=shortformer"], ["model.positional=rotary"],
                                   ["model.layernorm=false"])):
        run, model = fake_run(tmp_path / f"run{i}", overrides)
        out = export_run(run, tmp_path / f"tl{i}", "transformer_lens")[0]
        cfg = tl.HookedTransformerConfig(**json.loads((out / E.TL_CONFIG_FILE).read_text()))
        hooked = tl.HookedTransformer(cfg)
        missing, unexpected = hooked.load_state_dict(load_file(str(out / rundir.MODEL_FILE)), strict=False)
        assert not unexpected and all(k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing)
        x = tokens()
        assert (hooked(x) - model(x).logits).abs().max() < 1e-4, overrides


# -- other families --------------------------------------------------------------------------
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral")


def tiny_family(kind: str, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    if kind == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif kind == "gpt_neox":
        model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common, attention_bias=False))
    elif kind in ("llama", "qwen2", "mistral"):  # grouped keys and values: 2 key/value heads for 4 query heads
        config = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}[kind]
        model = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "mistral": T.MistralForCausalLM}[kind](
            config(**common, num_key_value_heads=2))
    else:
        model = T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    with torch.no_grad():  # random norm weights, so that a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            if kind == "gpt2" and name.endswith("attn.c_attn.bias") or name.endswith("attn.c_proj.bias"):
                p.zero_()
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.slow
def test_series_of_other_families(tmp_path):
    """Two-checkpoint series of tiny GPT-2, GPT-NeoX, Llama, Qwen2, Mistral and OPT models: every
    default callback's scores for the families the adapter maps, the behavioural ones and one note
    for OPT, a bad checkpoint recorded and passed."""
    probe_tensors = {"repeated": torch.cat([torch.zeros(4, 1, dtype=torch.long),
                                            torch.randperm(60)[:10].repeat(4, 3) + 2], 1),
                     "copy_tokens": torch.arange(2, 12), "heldout": tokens(64, 8, 32), "allowed": torch.arange(2, 62)}
    P.write_probe_file(tmp_path / P.PROBES_FILE, probe_tensors, {"icl_early": 3, "icl_late": 30, "n_previous_token": 4})
    behavioural = (N.PREFIX_MATCHING, N.DUPLICATE_TOKEN, N.PREVIOUS_TOKEN, N.PREFIX_MATCHING_MIN, N.PROBE_FRAGILE)
    mapped = (N.COPYING, N.OV_COPYING, N.IS_MECHANISTIC, N.ablated(N.ICL_SCORE, "zero"), N.ablated(N.REPEAT_LOSS, "mean"))
    for kind in (*FAMILIES, "opt"):
        for i, step in enumerate((0, 1000)):
            tiny_family(kind, i).save_pretrained(tmp_path / kind / f"step{step}")
        bad = tmp_path / kind / "step2000"
        tiny_family(kind, 2).save_pretrained(bad)
        (bad / rundir.MODEL_FILE).write_bytes(b"not safetensors")
        lines: list[str] = []
        out = tmp_path / f"out_{kind}"
        rows = S.run_series(str(tmp_path / kind), out, S.Options(probes=tmp_path, tokens_per_step=10), log=lines.append)
        assert [r[N.TOKENS] for r in rows] == [0, 10000]
        events = [r for r in read_metrics(out) if N.EVENT in r]
        assert [(e[N.EVENT], e[N.STEP]) for e in events] == [(S.FAILED, 2000)]
        assert any(line.startswith("error: step2000") for line in lines)
        for metric in (*behavioural, *mapped):
            heads = N.heads_in(rows[0], metric)
            assert len(heads) == (0 if kind == "opt" and metric in mapped else 8), (kind, metric)
        assert len(N.heads_in(rows[1], N.ablated(N.ICL_SCORE, "zero"))) == 0  # every 10th checkpoint
        assert (N.composition("k") + "/L1H0/L0H0" in rows[0]) == (kind != "opt")
        assert N.LOSS_HELDOUT in rows[0] and N.ICL_SCORE in rows[0]
        notes = [line for line in lines if line.startswith("note:")]
        assert len(notes) == (kind == "opt"), (kind, notes)
        if notes:
            assert notes[0].startswith("note: opt: behavioural scores only") and "callbacks.circuits" in notes[0]
        assert rows[0][N.PREFIX_MATCHING + "/L0H0"] != rows[1][N.PREFIX_MATCHING + "/L0H0"]


def test_probes_from_a_text_set():
    """build_probes over a tokenized text set: random tokens from the mid-frequency text tokens
    (the tokenizer's special ids never), the tokenizer's BOS first, the windows as held-out sequences;
    without a text set, ids 10%..50% of the vocabulary."""
    tokenizer = word_tokenizer(40)
    # word w{i} occurs 40 - i times: w0 the most common; "<s>" and "</s>" are special. Documents of
    # 15 words: each with its end-of-text token fills one window.
    words = [f"w{i}" for i in range(30) for _ in range(40 - i)]
    documents = [" ".join(words[j:j + 15]) for j in range(0, len(words), 15)]
    data = P.TokenWindows.from_text(documents, tokenizer, 17, 1000)
    assert data.bos == tokenizer.bos_token_id and set(data.excluded_ids) == set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    assert data.windows.shape[1] == 17 and (data.windows[:, 0] == data.bos).all()
    joined = [t for doc in documents for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]]
    assert data.windows[:, 1:].flatten().tolist() == joined[: data.windows.numel() - len(data.windows)]
    probes = P.build_probes(data, 17, n_probes=4, period=4, repeats=4, n_copy_tokens=6, n_heldout=3, seed=0)
    ids = {tokenizer.convert_tokens_to_ids(f"w{i}"): i for i in range(30)}
    seen = sorted(ids[t] for t in probes.allowed.tolist())  # 30 words seen (eos is special): 3 left out each side
    assert eos not in probes.allowed.tolist() and seen == list(range(3, 27))
    assert (probes.repeated[:, 0] == data.bos).all() and probes.repeated.shape == (4, 17)
    assert torch.equal(probes.heldout, data.windows[:3])
    assert set(probes.copy_tokens.tolist()) <= set(probes.allowed.tolist())
    none = P.TokenWindows.from_text(None, tokenizer, 17, 10)
    allowed = P.build_probes(none, 17, n_probes=2, period=4, repeats=4, n_heldout=3).allowed
    v = len(tokenizer)
    band = [i for i in range(v // 10, v // 2) if i not in tokenizer.all_special_ids]
    assert allowed.tolist() == band[len(band) // 10: len(band) - len(band) // 10]
    assert none.heldout(3, 0) is None


def word_tokenizer(n_words: int):
    """A transformers tokenizer of whole words w0..w{n_words - 1}, with <s>, </s> and <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *(f"w{i}" for i in range(n_words)), "<s>", "</s>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_series_of_a_model_with_a_text_set(tmp_path):
    """A Llama series with its tokenizer and a text file: probes built from the text (no --probes),
    held-out scores on the text windows."""
    tokenizer = word_tokenizer(40)
    (tmp_path / "text.txt").write_text(" ".join(f"w{(i * 7) % 40}" for i in range(3000)))
    for step in (0, 1):
        tiny_family("llama", step).save_pretrained(tmp_path / "m" / f"step{step}")
        tokenizer.save_pretrained(tmp_path / "m" / f"step{step}")
    rows = S.run_series(str(tmp_path / "m"), tmp_path / "out", S.Options(text=str(tmp_path / "text.txt"), n_ctx=48,
                                                                          n_text=16, period=10), log=lambda m: None)
    assert len(rows) == 2 and len(rows[0][N.PER_POSITION_LOSS]) == 47
    assert rows[0][N.ICL_EARLY] == round(48 * 50 / 512) and N.head_key(N.PREFIX_MATCHING_MIN, 1, 3) in rows[0]


def test_series_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    # No network and nothing cached: the hub is unreachable, for every revision alike.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert S.main(["EleutherAI/pythia-14m", "--revisions", "step1000", "--out", str(tmp_path / "o")]) == 2
    assert "hub" in one_line_error(capsys.readouterr().err)
    assert S.main(["EleutherAI/pythia-14m", "--out", str(tmp_path / "o")]) == 2
    assert "--revisions" in one_line_error(capsys.readouterr().err)
    (tmp_path / "run" / rundir.CHECKPOINTS).mkdir(parents=True)
    assert S.main([str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "is a run directory" in one_line_error(capsys.readouterr().err)
    # A probe token outside the model's vocabulary: the checkpoint is recorded as failed, and as
    # no checkpoint was scored, the series failed (exit 2, status.json `failed`).
    tiny_family("gpt2", 0).save_pretrained(tmp_path / "m" / "step5")
    P.write_probe_file(tmp_path / P.PROBES_FILE, {"repeated": torch.full((2, 9), 70), "copy_tokens": torch.arange(3),
                                                  "heldout": tokens(64, 2, 16)}, {})
    assert S.main([str(tmp_path / "m"), "--probes", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint was scored: 1 failed (first: step5: probe token id 70 is outside")
    assert read_metrics(tmp_path / "o2")[0][N.EVENT] == S.FAILED
    assert rundir.read_status(tmp_path / "o2")["state"] == rundir.FAILED


def test_pythia_schedule_and_revision_ranges():
    revs = hub_revisions(["pythia"])
    assert len(revs) == 154 and revs[:4] == ["step0", "step1", "step2", "step4"] and revs[-1] == "step143000"
    assert "step512" in revs and "step1000" in revs and "step1024" not in revs
    assert hub_revisions(["1000:3000:1000", "step42"]) == ["step1000", "step2000", "step3000", "step42"]
