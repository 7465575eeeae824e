"""Key covariance statistics: correctness, disk cache, resume after an interruption, damping, progress bar."""

from __future__ import annotations

import pytest
import torch

from eac_lightning.models.adapters import mlp_out_name
from eac_lightning.models.tracing import capture
from eac_lightning.stats import covariance as cov_mod
from eac_lightning.stats.covariance import (
    Covariance,
    CovarianceStore,
    _token_windows,
    stats_cache_key,
)

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
    fp = stats_cache_key(tiny_gpt2)
    name = mlp_out_name(tiny_gpt2, 0)
    w = tiny_gpt2.get_submodule(name).weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] += 1.0
    try:
        assert stats_cache_key(tiny_gpt2) != fp
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert stats_cache_key(tiny_gpt2) == fp


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


def test_token_count_is_exact_when_not_a_multiple_of_the_window(tiny_gpt2, tokenizer, corpus, names, tmp_path):
    n = SEQ * 5 + 7  # five windows and 7 tokens of a sixth
    c = _store(tiny_gpt2, tokenizer, corpus, tmp_path, num_tokens=n).get(names[0])
    assert c.count == n
    windows = [w for _, w in zip(range(6), _token_windows(tokenizer, corpus, SEQ))]
    with torch.no_grad(), capture(tiny_gpt2, [names[0]]) as rec:
        tiny_gpt2(input_ids=torch.stack(windows))
    k = rec[names[0]].input.reshape(-1, rec[names[0]].input.shape[-1]).double()[:n]
    torch.testing.assert_close(c.matrix, k.T @ k / n, rtol=1e-6, atol=1e-9)


def test_short_corpus_warns_and_is_keyed_by_the_tokens_seen(tiny_gpt2, tokenizer, tmp_path, names, monkeypatch):
    small = tmp_path / "small.txt"
    small.write_text("The Eiffel Tower is located in Paris . " * 40, encoding="utf-8")
    available = sum(len(w) for w in _token_windows(tokenizer, str(small), SEQ))
    with pytest.warns(UserWarning, match=f"only {available} tokens.*10000 requested"):
        c = _store(tiny_gpt2, tokenizer, str(small), tmp_path, num_tokens=10_000).get(names[0])
    assert c.count == available
    store = _store(tiny_gpt2, tokenizer, str(small), tmp_path, num_tokens=10_000)
    assert store.path(names[0], available).exists() and not store.path(names[0]).exists()

    def no_compute(self, missing):
        raise AssertionError(f"recomputed {missing}")

    monkeypatch.setattr(CovarianceStore, "_compute", no_compute)
    with pytest.warns(UserWarning, match="only"):  # found again under what was seen, and said again
        assert store.get(names[0]).count == available


@pytest.mark.parametrize("signal_kind", ["ctrl-c", "sigterm"])
def test_interrupt_saves_the_partial_sums_at_once(tiny_gpt2, tokenizer, corpus, names, tmp_path, signal_kind):
    """An interrupt before the first 30-s save still leaves the batches done."""
    import os
    import signal

    calls = {"n": 0}

    def interrupt_on_third_batch(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            if signal_kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt

    handle = tiny_gpt2.register_forward_pre_hook(interrupt_on_third_batch, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            _store(tiny_gpt2, tokenizer, corpus, tmp_path).get(names[0])
    finally:
        handle.remove()
    (partial,) = tmp_path.glob("*.partial.pt")
    saved = torch.load(partial, weights_only=True)
    assert saved["windows"] == 2 * BATCH and saved["count"] == 2 * BATCH * SEQ
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or signal_kind == "ctrl-c"


def test_import_of_published_mom2_npz(tiny_gpt2, tokenizer, names, tmp_path):
    """The ROME/MEMIT layer_stats layout: ``mom2.mom2`` the sum of k kᵀ, ``mom2.count`` the number of keys."""
    import numpy as np

    d = tiny_gpt2.get_submodule(names[0]).weight.shape[0]  # Conv1D (in, out): in = key dim
    keys = torch.randn(500, d, dtype=torch.float64)
    path = tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_100000.npz"
    np.savez(path, **{"mom2.mom2": (keys.T @ keys).float().numpy(), "mom2.count": np.array(500),
                      "mom2.constructor": np.array("util.runningstats.SecondMoment()")})
    store = CovarianceStore(tiny_gpt2, tokenizer, corpus="wikipedia", directory=tmp_path)
    c = store.import_mom2(names[0], path)
    torch.testing.assert_close(c.matrix, keys.T @ keys / 500, rtol=1e-6, atol=1e-6)
    # a fresh store configured the same way finds it without reading any corpus
    assert CovarianceStore(tiny_gpt2, tokenizer, corpus="wikipedia", directory=tmp_path).get(names[0]).count == 500
    np.savez(tmp_path / "bad.npz", mom2=np.zeros((d, d)))
    with pytest.raises(ValueError, match="bad.npz.*lacks.*mom2.count"):
        store.import_mom2(names[0], tmp_path / "bad.npz")
    np.savez(tmp_path / "wrong.npz", **{"mom2.mom2": np.zeros((3, 3)), "mom2.count": np.array(1)})
    with pytest.raises(ValueError, match=f"wrong.npz.*\\(3, 3\\).*dimension {d}"):
        store.import_mom2(names[0], tmp_path / "wrong.npz")


def test_exported_mom2_is_read_by_the_published_loader(tiny_gpt2, tokenizer, names, tmp_path):
    """The export carries ``sample_size``: ROME's, MEMIT's and EasyEdit's ``runningstats.load_cached_state(cache,
    {"sample_size": mom2_n_samples})`` reads ``dat["sample_size"]`` (a file without it raised KeyError there), and
    ``SecondMoment.load_state_dict`` reads ``mom2.count`` and ``mom2.mom2``; the file imports back unchanged."""
    import numpy as np

    store = CovarianceStore(tiny_gpt2, tokenizer, corpus="wikipedia", directory=tmp_path / "a")
    d = tiny_gpt2.get_submodule(names[0]).weight.shape[0]
    keys = torch.randn(300, d, dtype=torch.float64)
    store.import_mom2(names[0], _npz(tmp_path / "in.npz", keys.T @ keys, 300))
    out = store.export_mom2(names[0], tmp_path / f"{names[0]}_float32_mom2_100000.npz")
    with np.load(out) as dat:  # the published loader's checks, in its order
        assert {"sample_size": 100_000} == {a: int(dat[a]) for a in ["sample_size"]}
        count, mom2 = int(dat["mom2.count"]), torch.from_numpy(dat["mom2.mom2"])
    assert count == 300
    torch.testing.assert_close(mom2 / count, keys.T @ keys / 300)
    with np.load(store.export_mom2(names[0], tmp_path / "other.npz", sample_size=1000)) as dat:
        assert int(dat["sample_size"]) == 1000
    again = CovarianceStore(tiny_gpt2, tokenizer, corpus="wikipedia", directory=tmp_path / "b").import_mom2(names[0], out)
    torch.testing.assert_close(again.matrix, keys.T @ keys / 300)


def _npz(path, mom2: torch.Tensor, count: int):
    import numpy as np

    np.savez(path, **{"mom2.mom2": mom2.numpy(), "mom2.count": np.array(count)})
    return path


def test_stats_command_batch_and_length_options_and_import(tiny_gpt2, tokenizer, corpus, tmp_path, capsys,
                                                           monkeypatch):
    import numpy as np

    from eac_lightning.lightning.cli import main

    monkeypatch.setenv("EAC_CACHE_DIR", str(tmp_path / "cache"))
    tiny_gpt2.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    main(["stats", "--model", str(tmp_path / "m"), "--layers", "[1]", "--corpus", corpus, "--num_tokens", "100",
          "--batch_size", "2", "--seq_len", "16", "--device", "cpu"])
    assert "transformer.h.1.mlp.c_proj: 100 tokens" in capsys.readouterr().out
    d = tiny_gpt2.get_submodule("transformer.h.2.mlp.c_proj").weight.shape[0]
    np.savez(tmp_path / "mom2.npz", **{"mom2.mom2": np.eye(d, dtype=np.float32) * 7, "mom2.count": np.array(7)})
    main(["stats", "--model", str(tmp_path / "m"), "--layer", "2", "--import", str(tmp_path / "mom2.npz"),
          "--device", "cpu"])
    out = capsys.readouterr().out
    assert "imported" in out and "(7 keys)" in out and "--model.stats_corpus wikipedia" in out
    from eac_lightning.models.loading import load_model

    loaded, tok = load_model(str(tmp_path / "m"))  # as a run loads it (the fingerprint keys the cache)
    store = CovarianceStore(loaded, tok, corpus="wikipedia")
    torch.testing.assert_close(store.get("transformer.h.2.mlp.c_proj").matrix, torch.eye(d, dtype=torch.float64))


def test_two_writers_of_one_cache_file_both_succeed(tmp_path, monkeypatch):
    """Runs on one machine share the statistics cache: a second run saving the same matrix while the first is
    still writing it must not take the first's temporary file away (it did: FileNotFoundError in os.replace)."""
    path = tmp_path / "fp-layer.pt"
    real_save = torch.save
    nested = []

    def save_while_another_writer_finishes(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if not nested:  # the first writer's save is done but not yet renamed: the second writes in between
            nested.append(True)
            cov_mod._atomic_save({"mom2": torch.ones(2, 2), "count": 2}, path)

    monkeypatch.setattr(cov_mod.torch, "save", save_while_another_writer_finishes)
    cov_mod._atomic_save({"mom2": torch.ones(2, 2), "count": 2}, path)
    assert torch.load(path, weights_only=True)["count"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp-layer.pt"]  # no temporary file left behind


@pytest.mark.slow
def test_statistics_on_two_processes_equal_one_process_and_export_the_published_format(tiny_gpt2, tokenizer, corpus,
                                                                                      tmp_path):
    """``eac-lightning stats --devices 2 --accelerator cpu``: each process reads every other window, the float64
    sums are all-reduced; the exported mom2 files (ROME/MEMIT's format) of one and two processes agree."""
    import os
    import subprocess
    import sys

    import numpy as np

    tiny_gpt2.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    args = ["stats", "--model", str(tmp_path / "m"), "--layers", "[1, 2]", "--corpus", corpus, "--num_tokens", "500",
            "--batch_size", "2", "--seq_len", "16", "--accelerator", "cpu"]
    out = {}
    for devices in (1, 2):
        env = {**os.environ, "EAC_CACHE_DIR": str(tmp_path / f"cache{devices}"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "eac_lightning.lightning.cli", *args, "--devices", str(devices),
                               "--export_file", str(tmp_path / f"c{devices}.npz")], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[devices] = {layer: np.load(tmp_path / f"c{devices}-layer{layer}.npz") for layer in (1, 2)}
    for layer in (1, 2):
        one, two = out[1][layer], out[2][layer]
        assert int(one["mom2.count"]) == int(two["mom2.count"]) == 500
        np.testing.assert_allclose(two["mom2.mom2"], one["mom2.mom2"], rtol=1e-6, atol=1e-9 * abs(one["mom2.mom2"]).max())
        assert abs(one["mom2.mom2"]).max() > 0


def test_the_convergence_report_shrinks_to_the_full_count(tiny_gpt2, tokenizer, corpus, names):
    from eac_lightning.stats.covariance import convergence_report

    report = convergence_report(tiny_gpt2, tokenizer, names, corpus, 600, seq_len=16, batch_size=4,
                                fractions=(1 / 8, 1 / 2), holdout_windows=4)
    for rows in report.values():
        assert [r["tokens"] for r in rows] == [75, 300]
        assert rows[0]["relative_change"] > rows[1]["relative_change"] > 0  # more tokens, closer to the full C
    with pytest.raises(ValueError, match="lower --num_tokens"):
        convergence_report(tiny_gpt2, tokenizer, names, corpus, 10**7, seq_len=16)
