"""Natural text end to end: a corpus made here (the help texts CPython ships in pydoc_data), a BPE
trained in seconds, token shards cached and reused, exact resume, the repetition knob's
statistics, `[n, n_ctx]` token rows, and each data error as one line (exit 2). No network."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from tests.helpers import cli, compose_config, one_line_error
from train.core import rundir, text, token_cache
from train.cli import run
from train.core.language import BOS
from train.core.tokens import TextCorpus
from train.core.data import Repetition, build_text, build_tokens
from train.core.rundir import read_metrics

VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 120 kB of English prose (CPython's own help texts), one document per paragraph."""
    import pydoc_data.topics as topics

    path = tmp_path_factory.mktemp("corpus") / "help.txt"
    texts = [topics.topics[k] for k in sorted(topics.topics)]
    path.write_text("\n\n".join(texts)[:120_000])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


def _text(corpus, cache, *more):
    return ["data=text", f"data.source={corpus}", f"data.cache_dir={cache}", f"data.vocab_size={VOCAB}", *more]


def _corpus_data(corpus, cache, n_ctx=64, **kw):
    return build_text(vocab_size=VOCAB, n_ctx=n_ctx, source=str(corpus), cache_dir=str(cache), **kw)


def test_bpe_shards_decode_back_to_the_corpus_and_are_reused(corpus, cache, monkeypatch):
    data = _corpus_data(corpus, cache)
    assert isinstance(data, TextCorpus)
    meta = data.meta
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16"
    assert meta["documents"]["heldout"] * 19 <= meta["documents"]["train"] <= meta["documents"]["heldout"] * 21
    tok = text.TextTokenizer.load(data.tokenizer_dir)
    assert tok.tokenizer.convert_ids_to_tokens([0, 1]) == [text.BOS_TOKEN, text.EOD_TOKEN]
    source = corpus.read_text()
    batch = data.batch(0, 8)
    assert (batch[:, 0] == BOS).all() and batch.max() < VOCAB
    for seq in batch:  # every window decodes to corpus text (split at end-of-document tokens)
        for piece in tok.decode(seq[1:].tolist()).split(text.EOD_TOKEN):
            assert piece.strip()[:-2] in source
    for seq in data.heldout(4, seed=0):  # held-out windows come from held-out documents
        piece = max(tok.decode(seq[1:].tolist()).split(text.EOD_TOKEN), key=len)
        assert piece.strip()[:-2] in source
    # the second build reuses the shards: the corpus is not read again
    monkeypatch.setattr(text, "load_corpus", lambda *a, **k: pytest.fail("corpus read again"))
    again = _corpus_data(corpus, cache)
    assert again.entry == data.entry
    torch.testing.assert_close(again.batch(5, 4), data.batch(5, 4))


@pytest.mark.slow
def test_shards_split_at_the_size_limit_and_windows_cover_every_shard(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "SHARD_TOKENS", 4096)
    data = _corpus_data(corpus, tmp_path)
    sizes = [len(s) for s in data.train_streams]
    assert len(sizes) > 3 and all(n == 4096 for n in sizes[:-1])
    whole = np.concatenate([np.asarray(s) for s in data.train_streams])
    hits = set()
    for step in range(20):
        for seq in data.batch(step, 16):
            body = seq[1:].numpy()
            starts = np.flatnonzero(whole[: len(whole) - len(body) + 1] == body[0])
            start = next(s for s in starts if np.array_equal(whole[s : s + len(body)], body))
            hits.add(start // 4096)
    assert len(hits) >= len(sizes) - 1  # windows are drawn from all shards (none straddles two)


def test_a_transformers_tokenizer_from_a_local_path_is_shifted_by_one(corpus, cache, tmp_path):
    bpe = text.train_bpe(iter([corpus.read_text()[:20000]]), 300)
    bpe.tokenizer.save_pretrained(tmp_path / "tok")
    data = build_text(vocab_size=301, n_ctx=32, source=str(corpus), cache_dir=str(cache), tokenizer=str(tmp_path / "tok"))
    tok = text.TextTokenizer.load(data.tokenizer_dir)
    assert tok.offset == 1 and tok.eod == bpe.eod + 1
    seq = data.batch(0, 1)[0]
    assert seq[0] == BOS and (seq[1:] >= 1).all()
    with pytest.raises(ValueError, match="data.vocab_size=301"):
        build_text(vocab_size=300, n_ctx=32, source=str(corpus), cache_dir=str(cache), tokenizer=str(tmp_path / "tok"))


def test_repetition_knob_statistics(corpus, cache):
    plain = _corpus_data(corpus, cache)
    p, n = 0.3, 2000
    tiled = Repetition(plain, p=p, min_span=4, max_span=12, form="tile")
    seqs, orig = tiled.apply(plain.batch(0, n), torch.Generator().manual_seed(0)), plain.batch(0, n)
    changed = (seqs != orig).any(1)
    share = changed.float().mean().item()
    assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5  # binomial: within 4 standard errors
    for seq, src in zip(seqs[changed][:200], orig[changed][:200]):
        body = seq[1:]
        period = next(q for q in range(4, 13) if torch.equal(body[q:], body[:-q]))
        assert torch.equal(body[:period], src[1 : 1 + period])  # the sequence's own text, tiled
    copied = Repetition(plain, p=1.0, min_span=5, max_span=10, form="copy")
    seqs, orig = copied.apply(plain.batch(1, 500), torch.Generator().manual_seed(1)), plain.batch(1, 500)
    for seq, src in zip(seqs, orig):  # one later copy of the opening span, the rest untouched
        diff = (seq != src).nonzero().flatten()
        if len(diff):
            at = diff.min().item()
            assert diff.max().item() - at < 10 and at > 5
            assert any(torch.equal(seq[start : start + k], src[1 : 1 + k])
                       for k in range(5, 11) for start in range(max(at - k + 1, 6), at + 1))
    # training batches repeat, held-out sets stay plain; the mixture is the held-out set repeated
    torch.testing.assert_close(copied.heldout(8, 0), plain.heldout(8, 0))
    assert not torch.equal(copied.mixture(8, 0), plain.heldout(8, 0))
    torch.testing.assert_close(tiled.batch(3, 8), tiled.batch(3, 8))


def test_copy_form_places_exactly_one_later_copy_of_the_opening_span():
    src = torch.cat([torch.zeros(50, 1, dtype=torch.long), torch.arange(1, 64).repeat(50, 1)], 1)
    rep = Repetition(None, p=1.0, min_span=6, max_span=6, form="copy")
    out = rep.apply(src, torch.Generator().manual_seed(0))
    for seq in out:
        body = seq[1:]
        at = next(i for i in range(6, 63) if body[i] == 1)
        assert torch.equal(body[at : at + 6], torch.arange(1, 7))  # the opening span, copied once
        outside = torch.cat([body[:at], body[at + 6 :]])
        assert torch.equal(outside, torch.cat([torch.arange(1, at + 1), torch.arange(at + 7, 64)]))


def test_token_rows_are_kept_as_rows(tmp_path):
    rows = np.arange(40 * 15).reshape(40, 15) % 97 + 1  # [n, n_ctx - 1]: BOS is prepended
    np.save(tmp_path / "rows.npy", rows)
    data = build_tokens(vocab_size=100, n_ctx=16, path=str(tmp_path / "rows.npy"))
    as_rows = {tuple(r) for r in rows.tolist()}
    for seq in data.batch(0, 32):
        assert seq[0] == BOS and tuple(seq[1:].tolist()) in as_rows
    heldout = {tuple(s[1:].tolist()) for s in data.heldout(16, 0)}
    assert heldout <= {tuple(r) for r in rows[-2:].tolist()}  # the last 5% of rows
    np.save(tmp_path / "wide.npy", rows[:, :10])
    with pytest.raises(ValueError, match="rows of 10 tokens"):
        build_tokens(vocab_size=100, n_ctx=16, path=str(tmp_path / "wide.npy"))


def test_icl_score_standard_error_has_its_known_value():
    from train.core import metrics as M

    losses = torch.zeros(4, 10)
    losses[:, 8] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # late - early per sequence: 1, 2, 3, 4
    assert M.icl_score(losses.mean(0), 2, 8).item() == pytest.approx(2.5)
    assert M.icl_score_se(losses, 2, 8).item() == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert M.icl_score(losses.mean(0), 2, 8, window=1).item() == pytest.approx(2.5 / 3)  # 7..9 averaged


@pytest.mark.slow
def test_text_run_logs_plain_and_mixture_scores_and_resumes_exactly(corpus, cache, tmp_path, monkeypatch):
    """A text run with the repetition knob: the tokenizer goes into the run, both held-out sets are
    scored, and a run stopped by SIGTERM and resumed writes the same rows as an uninterrupted one."""
    from train.loop import Trainer

    overrides = _text(corpus, cache, "logger=none", "device=cpu", "data.repeat.p=0.5", "data.n_ctx=64", "train.total_tokens=40960",
                      "checkpoint.n_log=4", "checkpoint.n_linear=3", "probes.n_heldout=32",
                      *[f"~callbacks.{n}" for n in compose_config().callbacks if n not in ("attention", "heldout")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = tmp_path / "full"
        run(compose_config(overrides), full)
        clean_loss = Trainer.loss
        sent = []

        def term_at_step_2(self, tokens):
            if self.step == 2 and not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
            return clean_loss(self, tokens)

        monkeypatch.setattr(Trainer, "loss", term_at_step_2)
        stopped = tmp_path / "stopped"
        with pytest.raises(SystemExit) as exc:
            run(compose_config(overrides), stopped)
        assert exc.value.code == 128 + signal.SIGTERM
        run(compose_config([f"resume={stopped}"]), stopped)
    finally:
        torch.set_num_threads(threads)
    rows, ref = read_metrics(stopped / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")
    assert rows == ref and len(rows) >= 5
    last = rows[-1]
    for key in ("loss/heldout", "icl_score", "icl_score_se", "loss/heldout_mixture", "icl_score_mixture"):
        assert np.isfinite(last[key]), key
    assert last["icl_score_se"] > 0
    assert (full / rundir.TOKENIZER_DIR / "tokenizer.json").is_file()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(full / rundir.TOKENIZER_DIR))
    assert tok.decode(tok("The statement")["input_ids"]) == "The statement"
    # the tokenizer goes with a Hugging Face export of the run
    from transformers import AutoTokenizer

    from analysis.export import export_run

    [out] = export_run(full, tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(str(out))
    assert exported("The statement")["input_ids"] == tok("The statement")["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["hoogland_2l", "olsson_small", "text_cpu"])
def test_presets_run_a_few_steps_on_cpu_with_sizes_overridden(preset, corpus, cache, tmp_path):
    cfg = compose_config([f"experiment={preset}", f"data.source={corpus}", f"data.cache_dir={cache}",
                          "logger=none", "device=cpu", "data.n_ctx=64", "data.vocab_size=300", "model.d_model=32",
                          "train.batch_size=4", "train.total_tokens=768", "checkpoint.first_tokens=256",
                          "checkpoint.n_log=2", "checkpoint.n_linear=1", "probes.n_heldout=8", "probes.n_heldout_mixture=8",
                          "probes.icl_early=null",
                          "probes.icl_late=null"])
    full = compose_config([f"experiment={preset}", f"data.source={corpus}"])
    if preset == "hoogland_2l":
        assert (full.model.n_layers, full.model.d_model, full.model.n_heads, full.model.d_head) == (2, 256, 8, 32)
        assert (full.data.n_ctx, full.data.vocab_size, full.train.batch_size) == (1024, 5000, 100)
        assert full.model.positional == "shortformer" and full.optim.weight_decay == 0.05
        assert full.train.total_tokens // (100 * 1024) == 50_000
    if preset == "olsson_small":
        assert (full.probes.icl_early, full.probes.icl_late, full.data.n_ctx) == (50, 500, 512)
    row = run(cfg, tmp_path / preset)
    assert row["step"] == 3 and np.isfinite(row["loss/heldout"])


@pytest.mark.parametrize("case", ["missing_column", "empty", "small_vocab", "ids_outside", "hub_offline",
                                  "float_tokens", "no_source"])
@pytest.mark.slow
def test_text_errors_are_one_line_exit_2(case, corpus, tmp_path, capsys):
    args = ["logger=none", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}",
            "data=text", "data.vocab_size=300"]
    expect = {
        "missing_column": "has no column 'text'", "empty": "holds no text", "small_vocab": "too small for a byte-level BPE",
        "ids_outside": "set data.vocab_size=", "hub_offline": "cannot load the hub dataset 'nobody/no-such-corpus'",
        "float_tokens": "token ids must be integers", "no_source": "data=text needs data.source=FILE",
    }[case]
    if case == "missing_column":
        (tmp_path / "docs.jsonl").write_text(json.dumps({"content": "some words here"}) + "\n")
        args.append(f"data.source={tmp_path / 'docs.jsonl'}")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("\n\n\n")
        args.append(f"data.source={tmp_path / 'empty.txt'}")
    elif case == "small_vocab":
        args += [f"data.source={corpus}", "data.vocab_size=200"]
    elif case == "ids_outside":
        (tmp_path / "tok").mkdir()
        text.train_bpe(iter([corpus.read_text()[:20000]]), 300).tokenizer.save_pretrained(tmp_path / "tok")
        args += [f"data.source={corpus}", f"data.tokenizer={tmp_path / 'tok'}"]
    elif case == "hub_offline":
        args.append("data.source=nobody/no-such-corpus")
    elif case == "float_tokens":
        np.save(tmp_path / "f.npy", np.random.default_rng(0).random(5000))
        args = ["logger=none", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", "data=tokens",
                f"data.path={tmp_path / 'f.npy'}"]
    if case == "hub_offline":  # through the command line once
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expect in one_line_error(proc.stderr)
    else:
        with pytest.raises(SystemExit) as exc:
            run(compose_config([a for a in args if not a.startswith("hydra.")]), tmp_path / "run")
        assert exc.value.code == 2
        assert expect in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # nothing written
    cache = tmp_path / "c"
    if case in ("missing_column", "empty", "small_vocab", "hub_offline"):  # no half-built cache entry
        assert not cache.exists() or not [p for p in cache.iterdir() if p.suffix != ".lock"]


@pytest.mark.slow
def test_mixture_set_has_its_own_size(corpus, cache):
    """probes.n_heldout_mixture sizes the held-out set with the training repetition on its own
    (null: as many as the plain held-out set); the plain set keeps probes.n_heldout."""
    from hydra.utils import instantiate

    from train.core.probes import probes_from_config

    for extra, n_mixture in ((["probes.n_heldout_mixture=5"], 5), ([], 12)):
        cfg = compose_config(_text(corpus, cache, "data.repeat.p=0.5", "data.n_ctx=64", "probes.n_heldout=12", *extra))
        probes = probes_from_config(instantiate(cfg.data), 64, cfg.probes)
        assert probes.heldout.shape == (12, 64) and probes.heldout_mixture.shape == (n_mixture, 64)
    plain = compose_config(_text(corpus, cache, "data.n_ctx=64", "probes.n_heldout=12", "probes.n_heldout_mixture=5"))
    assert probes_from_config(instantiate(plain.data), 64, plain.probes).heldout_mixture is None
