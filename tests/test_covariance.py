"""Key covariance statistics: correctness, disk cache, resume after an interruption, damping, progress bar."""

from __future__ import annotations

import pytest
import torch

from eac_lightning.models.adapters import mlp_out_name
from eac_lightning.models.tracing import capture
from eac_lightning.stats import covariance as cov_mod
from eac_lightning.stats.covariance import Covariance, CovarianceStore, _token_windows, model_fingerprint

SEQ, BATCH, TOKENS = 32, 4, 32 * 4 * 3  # three batches


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wikitext_lines):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(wikitext_lines[:200]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def names(tiny_gpt2):
    return [mlp_out_name(tiny_gpt2, 1), mlp_out_name(tiny_gpt2, 2)]


def _store(model, tok, corpus, directory, **kw):
    args = dict(corpus=corpus, num_tokens=TOKENS, seq_len=SEQ, batch_size=BATCH, directory=directory)
    return CovarianceStore(model, tok, **{**args, **kw})


def _expected(model, tok, corpus, name, n_windows):
    windows = [w for _, w in zip(range(n_windows), _token_windows(tok, corpus, SEQ))]
    with torch.no_grad(), capture(model, [name]) as rec:
        model(input_ids=torch.stack(windows))
    k = rec[name].input.reshape(-1, rec[name].input.shape[-1]).double()
    return k.T @ k / k.shape[0]


def test_second_moment_is_uncentred_mean_of_key_outer_products(tiny_gpt2, tokenizer, corpus, names, tmp_path):
    store = _store(tiny_gpt2, tokenizer, corpus, tmp_path)
    store.prefetch(names)  # one pass for both layers
    for name in names:
        c = store.get(name)
        assert c.count == TOKENS and c.matrix.dtype == torch.float64
        torch.testing.assert_close(c.matrix, _expected(tiny_gpt2, tokenizer, corpus, name, TOKENS // SEQ),
                                   rtol=1e-6, atol=1e-9)
        assert store.path(name).exists()


def test_cache_hit_does_not_recompute(tiny_gpt2, tokenizer, corpus, names, tmp_path, monkeypatch):
    first = _store(tiny_gpt2, tokenizer, corpus, tmp_path)
    c1 = first.get(names[0])
    assert first.get(names[0]) is c1  # memory cache

    def no_compute(self, missing):
        raise AssertionError(f"recomputed {missing}")

    monkeypatch.setattr(CovarianceStore, "_compute", no_compute)
    second = _store(tiny_gpt2, tokenizer, corpus, tmp_path)  # a new process would look the same
    torch.testing.assert_close(second.get(names[0]).matrix, c1.matrix, rtol=0, atol=0)
    # Every part of the key separates cache entries.
    paths = {
        _store(tiny_gpt2, tokenizer, corpus, tmp_path, **kw).path(names[0])
        for kw in ({}, {"num_tokens": TOKENS * 2}, {"dtype": torch.float32})
    } | {CovarianceStore(tiny_gpt2, tokenizer, corpus=corpus + ".other", num_tokens=TOKENS,
                         directory=tmp_path).path(names[0])}
    assert len(paths) == 4 and first.path(names[1]) != first.path(names[0])


def test_fingerprint_follows_the_weights(tiny_gpt2):
    fp = model_fingerprint(tiny_gpt2)
    name = mlp_out_name(tiny_gpt2, 0)
    w = tiny_gpt2.get_submodule(name).weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] += 1.0
    try:
        assert model_fingerprint(tiny_gpt2) != fp
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert model_fingerprint(tiny_gpt2) == fp


def test_resume_after_interruption(tiny_gpt2, tokenizer, corpus, names, tmp_path, monkeypatch):
    """An interrupted run leaves partial sums; the next run continues from them and matches an uninterrupted one."""
    reference = _store(tiny_gpt2, tokenizer, corpus, tmp_path / "ref").get(names[0]).matrix

    class Clock:  # every call is 31 s later: the partial sums are saved after every batch
        t = 0.0

        @classmethod
        def time(cls):
            cls.t += 31.0
            return cls.t

    monkeypatch.setattr(cov_mod, "time", Clock)
    calls = {"n": 0}

    def interrupt_on_second_batch(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = tiny_gpt2.register_forward_pre_hook(interrupt_on_second_batch, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            _store(tiny_gpt2, tokenizer, corpus, tmp_path).get(names[0])
    finally:
        handle.remove()
    partial = list(tmp_path.glob("*.partial.pt"))
    assert len(partial) == 1
    assert torch.load(partial[0], weights_only=True)["windows"] == BATCH  # one batch was done and saved
    assert not any(tmp_path.glob(f"*{names[0]}*-{TOKENS}-float64.pt"))

    calls["n"] = 0
    handle = tiny_gpt2.register_forward_pre_hook(lambda m, a, k: calls.__setitem__("n", calls["n"] + 1),
                                                 with_kwargs=True)
    try:
        resumed = _store(tiny_gpt2, tokenizer, corpus, tmp_path).get(names[0])
    finally:
        handle.remove()
    assert calls["n"] == 2  # only the two batches that were missing
    assert resumed.count == TOKENS
    torch.testing.assert_close(resumed.matrix, reference, rtol=1e-12, atol=1e-12)
    assert not list(tmp_path.glob("*.partial.pt"))  # cleaned up once complete


def test_corrupt_cache_file_is_named(tiny_gpt2, tokenizer, corpus, names, tmp_path):
    store = _store(tiny_gpt2, tokenizer, corpus, tmp_path)
    store.path(names[0]).write_bytes(b"not a tensor file")
    with pytest.raises(RuntimeError) as err:
        store.get(names[0])
    assert str(store.path(names[0])) in str(err.value) and "delete it to recompute" in str(err.value)


def test_progress_bar_reports_tokens_per_second(tiny_gpt2, tokenizer, corpus, names, tmp_path, capsys):
    _store(tiny_gpt2, tokenizer, corpus, tmp_path).get(names[0])
    err = capsys.readouterr().err
    assert "key covariance (1 layers)" in err and "tok_s=" in err and f"{TOKENS}/{TOKENS}" in err


def test_damped_solve_uses_a_cached_factor_and_tames_an_ill_conditioned_c():
    """solve(b) = (C + ε·tr(C)/d·I)⁻¹ b; a rank-deficient C (few tokens, many dims) has no undamped factor."""
    torch.manual_seed(0)
    d, n = 24, 8
    k = torch.randn(n, d, dtype=torch.float64)
    k[:, -4:] = 0  # dead units, and rank 8 < 24: singular, as a small corpus makes C of a wide layer
    c = k.T @ k / n
    cov = Covariance(c, n, damping=1e-2)
    b = torch.randn(d, 3, dtype=torch.float64)
    expected = torch.linalg.solve(c + 1e-2 * torch.trace(c) / d * torch.eye(d, dtype=torch.float64), b)
    torch.testing.assert_close(cov.solve(b), expected)
    factor = cov._chol
    torch.testing.assert_close(cov.solve(b[:, 0]), expected[:, 0])  # a vector right-hand side too
    assert cov._chol is factor  # factorised once
    # Without damping there is no Cholesky factor at all; with it, the solution is bounded by 1/(ε·tr(C)/d).
    with pytest.raises(torch.linalg.LinAlgError):
        Covariance(c, n, damping=0.0).solve(b)
    bound = b.norm(dim=0) / (1e-2 * torch.trace(c) / d)
    assert (cov.solve(b).norm(dim=0) <= bound * (1 + 1e-9)).all()
