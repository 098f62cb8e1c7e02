"""The embedded data: seeded, deterministic per step, the promised structure, exposed through
Hugging Face `datasets`, and token files from disk."""
import numpy as np
import pytest
import torch

from train.core.language import BOS, RepeatsLanguage
from train.core.tokens import token_file
from train.core.data import build_tokens
from train.core.probes import build_probes, probe_tokens


def _lang(**kw):
    return RepeatsLanguage(vocab_size=64, n_ctx=64, seed=0, **kw)


def _period(seq):
    body = seq[1:]
    for p in range(1, len(body)):
        if torch.equal(body[p:], body[:-p]):
            return p
    return None


def test_batches_are_a_pure_function_of_step():
    a, b = _lang(), _lang()
    torch.testing.assert_close(a.batch(5, 8), b.batch(5, 8))
    assert not torch.equal(a.batch(5, 8), a.batch(6, 8))
    assert not torch.equal(a.batch(5, 8), RepeatsLanguage(64, 64, seed=1).batch(5, 8))


def test_batches_made_in_blocks_equal_one_batch_at_a_time():
    """Training batches come from blocks of steps with one chain walk: each equals the batch of
    its step sampled alone, across block boundaries, in any order, and a caller's change to a
    batch does not reach the next call."""
    from train.core.language import BATCH_BLOCK, generator

    lang = RepeatsLanguage(seed=3)
    for step in (0, 1, BATCH_BLOCK - 1, BATCH_BLOCK, 5 * BATCH_BLOCK + 7, 2):
        for batch_size in (64, 5):
            alone = lang.sample(batch_size, generator(3, 1, step))
            assert torch.equal(lang.batch(step, batch_size), alone)
    first = lang.batch(9, 8)
    first.zero_()
    assert torch.equal(lang.batch(9, 8), lang.sample(8, generator(3, 1, 9)))


def test_sequences_start_with_bos_and_stay_in_vocabulary():
    x = _lang().batch(0, 256)
    assert (x[:, 0] == BOS).all()
    assert x[:, 1:].min() >= 1 and x.max() < 64


def test_repeated_segments_have_random_periods():
    lang = _lang(p_repeat=0.6, min_period=4, max_period=20)
    x = lang.batch(0, 400)
    periods = [_period(s) for s in x]
    repeated = [p for p in periods if p is not None and p <= 20]
    assert 0.5 < len(repeated) / len(x) < 0.7
    assert len(set(repeated)) >= 12  # many different periods: no fixed offset solves it
    assert min(repeated) >= 1 and max(repeated) <= 20


def test_bigram_chain_is_learnable_structure():
    lang = _lang(p_repeat=0.0)
    x = lang.batch(0, 200)[:, 1:]
    pairs = torch.stack([x[:, :-1].flatten(), x[:, 1:].flatten()], 1)
    successors = {}
    for a, b in pairs.tolist():
        successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 4  # each token has at most `branching` successors


def test_heldout_set_differs_from_training_batches():
    lang = _lang()
    held = lang.heldout(32, seed=1)
    assert held.shape == (32, 64)
    train_rows = {tuple(r.tolist()) for s in range(5) for r in lang.batch(s, 32)}
    assert not any(tuple(r.tolist()) in train_rows for r in held)


def test_exposed_as_datasets_objects():
    lang = _lang()
    ds = lang.as_dataset(16, seed=1)
    assert len(ds) == 16 and ds.column_names == ["input_ids"]
    torch.testing.assert_close(ds[:]["input_ids"], lang.heldout(16, 1))
    it = iter(lang.as_iterable_dataset(batch_size=8))
    first = torch.tensor([next(it)["input_ids"] for _ in range(8)])
    torch.testing.assert_close(first, lang.batch(0, 8))


def test_probe_tokens_exclude_most_and_least_common():
    freq = torch.tensor([0.0] + [float(i) for i in range(1, 21)])  # token t has frequency t
    allowed = probe_tokens(freq, exclude_fraction=0.1)
    assert allowed.tolist() == list(range(3, 19))
    # tokens the data never uses (bytes a corpus lacks) are never probe tokens, and do not count
    unused = torch.cat([freq, torch.zeros(30)])
    assert probe_tokens(unused, exclude_fraction=0.1).tolist() == list(range(3, 19))


def test_probes_scale_down_to_short_contexts():
    lang = _lang()
    probes = build_probes(lang, n_ctx=64, n_probes=4, period=25, repeats=4, n_heldout=8)
    assert probes.period == 15 and probes.repeated.shape == (4, 61)
    long_lang = RepeatsLanguage(vocab_size=64, n_ctx=128)
    probes = build_probes(long_lang, n_ctx=128, n_probes=4, n_heldout=8)
    assert probes.period == 25 and probes.repeated.shape == (4, 101)


def test_token_file_npy_and_datasets_dir(tmp_path):
    tokens = np.random.default_rng(0).integers(1, 30, size=5000)
    np.save(tmp_path / "tokens.npy", tokens)
    src = build_tokens(vocab_size=30, n_ctx=16, path=str(tmp_path / "tokens.npy"))
    x = src.batch(0, 4)
    assert x.shape == (4, 16) and (x[:, 0] == BOS).all()
    torch.testing.assert_close(x, src.batch(0, 4))

    import datasets

    datasets.Dataset.from_dict({"input_ids": tokens.reshape(50, 100).tolist()}).save_to_disk(tmp_path / "ds")
    src2 = token_file(str(tmp_path / "ds"), n_ctx=16, vocab_size=30)
    assert src2.batch(3, 2).shape == (2, 16)


def test_token_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokens(vocab_size=30, n_ctx=16, path=str(tmp_path / "missing.npy"))
    np.save(tmp_path / "big.npy", np.full(100, 99))
    with pytest.raises(ValueError, match="outside"):
        build_tokens(vocab_size=30, n_ctx=16, path=str(tmp_path / "big.npy"))
