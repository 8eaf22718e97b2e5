"""The vLLM log-prob parser on hand-made outputs (no engine): log μ(a_t) is the sampled token's own entry, the top-K
are sorted by rank with a_t's extra entry left out, ties and −inf handled, anything else a clear error.

The dicts are built the way vLLM builds them: the sampler's row is [a_t, top-1, …, top-K] with a_t's rank = the
number of tokens whose log-prob is ≥ its own (``vllm.v1.sample.sampler.Sampler.gather_logprobs``), and
``vllm.logprobs.append_logprobs_for_next_position`` turns it into {id: Logprob} (a_t first; a top-K entry with the
same id overwrites it). Where vllm is installed its own function builds them; the local copy below is checked
against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from dppo.engines.vllm import parse_completion, parse_position

NEG_INF = float("-inf")


@dataclass
class Logprob:  # the fields of vllm.logprobs.Logprob that the parser reads
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def local_entries(sampled: int, sampled_lp: float, sampled_rank: int, top_ids, top_lps) -> dict:
    out = {sampled: Logprob(sampled_lp, sampled_rank)}
    for r, (i, v) in enumerate(zip(top_ids, top_lps), start=1):
        out[i] = Logprob(v, r)
    return out


def vllm_entries(sampled: int, sampled_lp: float, sampled_rank: int, top_ids, top_lps) -> dict:
    from vllm.logprobs import append_logprobs_for_next_position

    seq: list = []
    ids, lps = [sampled, *top_ids], [sampled_lp, *top_lps]
    append_logprobs_for_next_position(seq, ids, lps, [None] * len(ids), sampled_rank, len(top_ids))
    return seq[0]


def sampler_row(logq: torch.Tensor, a: int, k: int, build=local_entries) -> dict:
    """Entries for one position from a log-prob row, as vLLM's sampler computes them."""
    v, i = torch.topk(logq, k)
    rank = int((logq >= logq[a]).sum())
    return build(a, float(logq[a]), rank, i.tolist(), v.tolist())


def test_local_builder_matches_vllms():
    pytest.importorskip("vllm")
    logq = torch.log_softmax(torch.tensor([2.0, 1.0, 1.0, 0.5, -1.0, 3.0]), -1)
    for a in range(6):
        for k in (1, 2, 4):
            want = sampler_row(logq, a, k, vllm_entries)
            got = sampler_row(logq, a, k, local_entries)
            assert list(want) == list(got)
            assert [(e.logprob, e.rank) for e in want.values()] == [(e.logprob, e.rank) for e in got.values()]


@pytest.mark.parametrize("build", ["local", "vllm"])
def test_against_a_distribution(build):
    """Every position of a random distribution: log μ(a) = log_softmax at a, top-K = torch.topk, K or K+1 entries."""
    if build == "vllm":
        pytest.importorskip("vllm")
    fn = vllm_entries if build == "vllm" else local_entries
    g = torch.Generator().manual_seed(0)
    logq = torch.log_softmax(torch.randn(40, 50, generator=g) * 2, -1)
    cases = {"inside": 0, "outside": 0}
    for row in logq:
        for a in torch.randint(0, 50, (5,), generator=g).tolist():
            entries = sampler_row(row, a, 5, fn)
            lp, ids, vals = parse_position(entries, a, 5)
            v, i = torch.topk(row, 5)
            assert lp == float(row[a])  # the sampled token's entry, not the first one
            assert ids == i.tolist() and vals == v.tolist()
            assert len(entries) == (5 if a in ids else 6)
            cases["inside" if a in ids else "outside"] += 1
    assert min(cases.values()) > 10  # both layouts were exercised


def test_rank_sorted_first_entry_is_not_mu():
    """TRL (1.16, GRPOTrainer with vLLM) sorts the entries by rank and keeps the first: the top-1, which is log μ(a_t)
    only when a_t is the top-1 (or K = 0). The parser reads a_t's own entry."""
    logq = torch.log_softmax(torch.tensor([0.0, 3.0, 2.0, 1.0]), -1)
    for a, k in ((2, 3), (0, 2)):  # a_t inside the top-K (K entries), outside (K+1)
        entries = sampler_row(logq, a, k)
        rank_first = sorted(entries.items(), key=lambda te: te[1].rank)[0]
        assert rank_first[0] == 1 and rank_first[1].logprob != float(logq[a])
        lp, ids, vals = parse_position(entries, a, k)
        assert lp == float(logq[a]) and ids == [1, 2, 3][:k]
        # vLLM 0.32 inserts a_t first, so insertion order happens to lead with a_t: not relied upon
        assert next(iter(entries)) == a
    assert [e.rank for e in sampler_row(logq, 2, 3).values()] == [2, 1, 3]  # inside: the top-K rank overwrote
    assert sampler_row(logq, 0, 2)[0].rank == 4  # outside: its vocabulary rank


def test_rank_tie_sampled_token_outside_topk_with_a_topk_rank():
    """a_t ties the K-th token but torch.topk picked the other one: a_t's rank (count of ≥) is ≤ K, so two entries
    claim a rank ≤ K; the top-K are the topk's own, a_t is outside them (K+1 entries)."""
    logq = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.2]))
    v, i = torch.topk(logq, 2)
    tied_out = next(t for t in (1, 2, 3) if t not in i.tolist())
    entries = sampler_row(logq, tied_out, 2)
    assert len(entries) == 3 and entries[tied_out].rank == 4  # ≥ counts every tie
    lp, ids, vals = parse_position(entries, tied_out, 2)
    assert ids == i.tolist() and lp == float(logq[tied_out])
    # the same with a hand-set rank 2 (a count of strictly greater + 1, as other versions compute it)
    entries = local_entries(tied_out, float(logq[tied_out]), 2, i.tolist(), v.tolist())
    assert sorted(e.rank for e in entries.values()) == [1, 2, 2]
    lp2, ids2, _ = parse_position(entries, tied_out, 2)
    assert (lp2, ids2) == (lp, ids)


def test_flat_distribution_all_tied():
    v = 8
    logq = torch.full((v,), -math.log(v))
    for a in range(v):
        entries = sampler_row(logq, a, 1)
        lp, ids, vals = parse_position(entries, a, 1)
        assert lp == pytest.approx(-math.log(v)) and vals == [pytest.approx(-math.log(v))] and len(ids) == 1
        assert len(entries) == (1 if ids == [a] else 2)


def test_truncated_tokens_are_minus_inf_in_topk():
    # top-k 2 truncation: μ over the kept 2, −inf elsewhere; asking K = 4 lists two −inf entries, legally
    logq = torch.tensor([math.log(0.7), math.log(0.3), NEG_INF, NEG_INF, NEG_INF])
    entries = sampler_row(logq, 1, 4)
    lp, ids, vals = parse_position(entries, 1, 4)
    assert lp == pytest.approx(math.log(0.3)) and ids[:2] == [0, 1] and vals[2:] == [NEG_INF, NEG_INF]


@pytest.mark.parametrize("bad", [NEG_INF, float("nan"), 0.5])
def test_impossible_sampled_logp_is_an_error(bad):
    entries = local_entries(3, bad, 1, [3, 1], [bad, -1.0])
    with pytest.raises(ValueError, match="sampled token 3"):
        parse_position(entries, 3, 2)


def test_malformed_entries_are_errors():
    ok = local_entries(0, -2.0, 3, [1, 2], [-0.5, -1.0])
    with pytest.raises(ValueError, match="no log-prob for the sampled token 5"):
        parse_position(ok, 5, 2)
    with pytest.raises(ValueError, match="expected 1"):  # asked K = 1 of a K = 2 output
        parse_position(ok, 0, 1)
    far = local_entries(0, -2.0, 5, [1, 2], [-0.5, -1.0])  # a_t ranked 5th: as a top-3 it leaves a hole
    with pytest.raises(ValueError, match="ranks"):
        parse_position(far, 0, 3)
    bad_rank = {0: Logprob(-2.0, 3), 1: Logprob(-0.5, 1), 2: Logprob(-1.0, 3)}
    with pytest.raises(ValueError, match="ranks"):
        parse_position(bad_rank, 0, 2)
    nan_top = local_entries(0, -2.0, 3, [1, 2], [-0.5, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        parse_position(nan_top, 0, 2)
    unsorted = local_entries(0, -2.0, 3, [1, 2], [-1.0, -0.5])
    with pytest.raises(ValueError, match="not sorted"):
        parse_position(unsorted, 0, 2)


def test_k0_gives_the_sampled_entry_only():
    entries = {4: Logprob(-1.25, 7)}
    assert parse_position(entries, 4, 0) == (-1.25, [], [])


def test_completion_positions_and_greedy():
    logq = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]]), -1)
    toks = [0, 2]
    rows = [sampler_row(q, a, 2) for q, a in zip(logq, toks)]
    lps, ids, vals = parse_completion(toks, rows, 2)
    assert lps == [float(logq[0, 0]), float(logq[1, 2])] and ids == [[1, 0], [2, 0]]
    lps, ids, vals = parse_completion(toks, rows, 2, greedy=True)  # μ is a point mass at the argmax
    assert lps == [0.0, 0.0] and vals == [[NEG_INF, 0.0], [0.0, NEG_INF]]
    with pytest.raises(ValueError, match="1 of 2 generated tokens"):
        parse_completion(toks, rows[:1], 2)
    with pytest.raises(ValueError, match="position 1"):
        parse_completion([0, 1], rows, 2)  # token 1 has no entry at position 1


def test_flat_logprobs_container():
    """vLLM's FlatLogprobs (flat_logprobs=True) keeps a_t's and the top-K rows side by side; read position by
    position it gives the same dicts, so the parser reads it unchanged."""
    flat_mod = pytest.importorskip("vllm.logprobs")
    logq = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 3.0, 1.0]]), -1)
    toks = [3, 2]
    flat = flat_mod.FlatLogprobs()
    for q, a in zip(logq, toks):
        v, i = torch.topk(q, 2)
        flat_mod.append_logprobs_for_next_position(flat, [a, *i.tolist()], [float(q[a]), *v.tolist()], [None] * 3,
                                                   int((q >= q[a]).sum()), 2)
    lps, ids, _ = parse_completion(toks, flat, 2)
    assert lps == [float(logq[0, 3]), float(logq[1, 2])] and ids == [[1, 0], [2, 3]]
