"""Sampler tests on hand-made and known distributions: one group per knob."""
import ctypes
import math

import pytest
import torch

from hetero_moe.errors import HeteroMoEError
from hetero_moe.sampling import (Sampler, SamplingParamError, SamplingParams, StopMatcher,
                                 token_logprob, top_logprobs)

# Chi-square critical value at the 0.001 level for 5 degrees of freedom (6 categories).
CHI2_999_DF5 = 20.515


def plain(**kw) -> SamplingParams:
    """Every filter off, temperature 1; kw overrides."""
    fields = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    fields.update(kw)
    return SamplingParams(**fields)


def logits_of(probs) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def draw_counts(sampler: Sampler, logits: torch.Tensor, n: int, history=()) -> torch.Tensor:
    counts = torch.zeros(logits.numel(), dtype=torch.long)
    for _ in range(n):
        counts[sampler.sample(logits, history)] += 1
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def kept_ids(sampler: Sampler, logits: torch.Tensor) -> set[int]:
    return set(sampler.candidates(logits)[0].tolist())


# ---- temperature ----

LOGITS6 = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temp):
    n = 6000
    counts = draw_counts(Sampler(plain(temperature=temp, seed=7), 6), LOGITS6, n)
    want = torch.softmax(LOGITS6.double() / temp, 0)
    assert chi_square(counts, want) < CHI2_999_DF5
    # The test has power: the same counts are far from the distribution at another temperature.
    other = torch.softmax(LOGITS6.double() / (temp * 2), 0)
    assert chi_square(counts, other) > 5 * CHI2_999_DF5


def test_temperature_zero_is_argmax():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000, generator=g)
        s = Sampler(SamplingParams(temperature=0.0), 1000)
        assert s.sample(logits, []) == int(torch.argmax(logits))


def test_greedy_ties_go_to_lowest_id():
    s = Sampler(SamplingParams.greedy(), 6)
    assert s.sample(torch.tensor([1.0, 3.0, 0.0, 3.0, 3.0, -1.0]), []) == 1


def test_greedy_is_argmax_after_penalties():
    s = Sampler(SamplingParams.greedy(repeat_penalty=4.0), 3)
    logits = torch.tensor([2.0, 1.0, 0.0])
    assert s.sample(logits, [0]) == 1          # 2.0 / 4 = 0.5 < 1.0


def test_greedy_constructor():
    p = SamplingParams.greedy(top_k=5, frequency_penalty=0.5)
    assert (p.temperature, p.repeat_penalty, p.presence_penalty) == (0.0, 1.0, 0.0)
    assert (p.top_k, p.frequency_penalty) == (5, 0.5)
    with pytest.raises(SamplingParamError, match="top_p"):
        SamplingParams.greedy(top_p=2.0)


# ---- top_k ----

def test_top_k_never_samples_outside():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, generator=g)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    counts = draw_counts(Sampler(plain(top_k=5, temperature=3.0), 50), logits, 1000)
    drawn = set(torch.nonzero(counts).squeeze(1).tolist())
    assert drawn == top5


def test_top_k_renormalizes_the_kept_set():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    counts = draw_counts(Sampler(plain(top_k=2, seed=3), 4), logits, 4000)
    assert counts[2:].sum() == 0
    want = torch.tensor([4 / 7, 3 / 7], dtype=torch.float64)
    expected = want * 4000
    assert float(((counts[:2].double() - expected) ** 2 / expected).sum()) < 10.83  # df 1, 0.001


def test_top_k_one_is_greedy():
    g = torch.Generator().manual_seed(2)
    for seed in range(20):
        logits = torch.randn(300, generator=g)
        s = Sampler(SamplingParams(top_k=1, temperature=5.0, seed=seed), 300)
        assert s.sample(logits, []) == int(torch.argmax(logits))


def test_top_k_at_or_above_vocab_or_zero_keeps_all():
    logits = torch.randn(10)
    for k in (0, -1, 10, 99):
        assert kept_ids(Sampler(plain(top_k=k), 10), logits) == set(range(10))


# ---- top_p ----

# Probabilities placed out of vocabulary order, so sorting is exercised.
TOP_P_PROBS = [0.075, 0.5, 0.05, 0.25, 0.125]   # sorted: ids 1, 3, 4, 0, 2


@pytest.mark.parametrize("p,want", [
    (0.3, {1}), (0.5, {1}), (0.5001, {1, 3}), (0.75, {1, 3}), (0.7501, {1, 3, 4}),
    (0.875, {1, 3, 4}), (0.876, {1, 3, 4, 0}), (0.95, {1, 3, 4, 0}), (0.9501, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_smallest_prefix_reaching_p(p, want):
    s = Sampler(plain(top_p=p), 5)
    assert kept_ids(s, logits_of(TOP_P_PROBS)) == want


def test_top_p_draws_only_from_kept_set():
    counts = draw_counts(Sampler(plain(top_p=0.75), 5), logits_of(TOP_P_PROBS), 2000)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1] / 2000 - 2 / 3) < 0.05


def test_temperature_applies_after_filters():
    # top_p 0.75 keeps ids {1, 3} at temperature 1; temperature 2 then reshapes only those two.
    logits = logits_of(TOP_P_PROBS)
    s = Sampler(plain(top_p=0.75, temperature=2.0, seed=4), 5)
    assert kept_ids(s, logits) == {1, 3}
    counts = draw_counts(s, logits, 4000)
    assert counts[[0, 2, 4]].sum() == 0
    want = torch.softmax(logits[[1, 3]].double() / 2.0, 0) * 4000
    assert float(((counts[[1, 3]].double() - want) ** 2 / want).sum()) < 10.83  # df 1, 0.001


def test_top_p_applies_after_top_k():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    assert kept_ids(Sampler(plain(top_p=0.5), 4), logits) == {0, 1}
    # top_k=2 renormalizes to [4/7, 3/7], and 4/7 alone reaches 0.5.
    assert kept_ids(Sampler(plain(top_k=2, top_p=0.5), 4), logits) == {0}


@pytest.mark.parametrize("scale", [6.0, 1.0, 0.05])   # peaked (fast path), flat, nearly uniform
def test_top_p_large_vocab_matches_full_sort(scale):
    v, p = 150_000, 0.9
    logits = torch.randn(v, generator=torch.Generator().manual_seed(5)) * scale
    order = torch.sort(logits.double(), descending=True)
    cum = torch.cumsum(torch.softmax(order.values, 0), 0)
    t = int(torch.searchsorted(cum, p))
    want = set(order.indices[:t + 1].tolist())
    got = kept_ids(Sampler(plain(top_p=p), v), logits)
    assert len(got ^ want) <= 1                # at most a float-rounding edge token


# ---- min_p ----

def test_min_p_threshold():
    # p_max = 0.5, min_p 0.1 -> threshold 0.05: keep 0.06 and above, never 0.04 or 0.02.
    probs = [0.02, 0.5, 0.06, 0.04, 0.2, 0.18]
    logits = logits_of(probs)
    s = Sampler(plain(min_p=0.1), 6)
    assert kept_ids(s, logits) == {1, 2, 4, 5}
    counts = draw_counts(s, logits, 3000)
    assert counts[0] == 0 and counts[3] == 0 and counts[2] > 0


def test_min_p_with_top_p_and_top_k():
    logits = logits_of([0.02, 0.5, 0.06, 0.04, 0.2, 0.18])
    # min_p keeps {1,2,4,5}; top_p 0.8 keeps {1,4,5}; top_k 2 keeps {1,4}.
    assert kept_ids(Sampler(plain(min_p=0.1, top_p=0.8), 6), logits) == {1, 4, 5}
    assert kept_ids(Sampler(plain(min_p=0.1, top_p=0.8, top_k=2), 6), logits) == {1, 4}
    assert kept_ids(Sampler(plain(min_p=1.0), 6), logits) == {1}


# ---- repeat / frequency / presence penalties ----

PEN_LOGITS = torch.tensor([2.0, -2.0, 0.0, 1.0, -1.0, 3.0])


def test_repeat_penalty_llama_cpp_semantics():
    s = Sampler(plain(repeat_penalty=2.0, repeat_last_n=-1), 6)
    out = s.penalize(PEN_LOGITS, [0, 1, 2, 0, 0])   # repeats count once
    assert torch.equal(out, torch.tensor([1.0, -4.0, 0.0, 1.0, -1.0, 3.0]))
    assert torch.equal(PEN_LOGITS, torch.tensor([2.0, -2.0, 0.0, 1.0, -1.0, 3.0]))  # not mutated


def test_repeat_penalty_window():
    hist = [0, 1, 4, 5]
    out = Sampler(plain(repeat_penalty=2.0, repeat_last_n=2), 6).penalize(PEN_LOGITS, hist)
    assert torch.equal(out, torch.tensor([2.0, -2.0, 0.0, 1.0, -2.0, 1.5]))
    out = Sampler(plain(repeat_penalty=2.0, repeat_last_n=64), 6).penalize(PEN_LOGITS, hist)
    assert torch.equal(out, torch.tensor([1.0, -4.0, 0.0, 1.0, -2.0, 1.5]))
    out = Sampler(plain(repeat_penalty=2.0, repeat_last_n=0), 6).penalize(PEN_LOGITS, hist)
    assert torch.equal(out, PEN_LOGITS)


def test_repeat_penalty_below_one_boosts():
    out = Sampler(plain(repeat_penalty=0.5), 6).penalize(PEN_LOGITS, [0, 1])
    assert out[0] == 4.0 and out[1] == -1.0


def test_frequency_and_presence_penalties_exact():
    s = Sampler(plain(frequency_penalty=0.5, presence_penalty=0.25, repeat_last_n=-1), 6)
    out = s.penalize(PEN_LOGITS, [3, 3, 3, 1, 5])
    want = PEN_LOGITS.clone()
    want[3] -= 3 * 0.5 + 0.25
    want[1] -= 1 * 0.5 + 0.25
    want[5] -= 1 * 0.5 + 0.25
    assert torch.equal(out, want)


def test_all_penalties_together_and_windowed_counts():
    # Window of 3 over [5, 3, 3, 1]: counts {3: 2, 1: 1}; token 5 is outside.
    s = Sampler(plain(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=-0.25,
                      repeat_last_n=3), 6)
    out = s.penalize(PEN_LOGITS, [5, 3, 3, 1])
    want = PEN_LOGITS.clone()
    want[3] = 1.0 / 2.0 - 2 * 0.5 + 0.25
    want[1] = -2.0 * 2.0 - 1 * 0.5 + 0.25
    assert torch.equal(out, want)


def test_penalties_change_the_sampled_distribution():
    # Token 0 dominates until a huge presence penalty removes it.
    s = Sampler(plain(presence_penalty=100.0), 3)
    counts = draw_counts(s, torch.tensor([10.0, 0.0, 0.0]), 200, history=[0])
    assert counts[0] == 0


# ---- seeds ----

def test_same_seed_same_tokens_different_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(9))

    def run(seed):
        s = Sampler(SamplingParams(seed=seed, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0),
                    1000)
        hist = []
        for _ in range(40):
            hist.append(s.sample(logits, hist))
        return hist
    assert run(42) == run(42)
    assert run(42) != run(43)


def test_seed_none_is_random_and_recorded():
    a, b = Sampler(SamplingParams(), 10), Sampler(SamplingParams(), 10)
    assert a.seed != b.seed
    c = Sampler(SamplingParams(seed=a.seed), 10)
    logits = torch.randn(10)
    assert [a.sample(logits, []) for _ in range(20)] == [c.sample(logits, []) for _ in range(20)]


# ---- stop sequences ----

def feed_all(m: StopMatcher, pieces) -> tuple[str, bool]:
    out, stopped = "", False
    for piece in pieces:
        text, stopped = m.feed(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += m.flush()
    return out, stopped


def test_stop_inside_one_piece():
    assert feed_all(StopMatcher(["END"]), ["hello END world"]) == ("hello ", True)


def test_stop_spanning_pieces():
    m = StopMatcher(["</s>"])
    assert m.feed("abc<") == ("abc", False)
    assert m.feed("/") == ("", False)
    assert m.feed("s>tail") == ("", True)
    assert m.flush() == ""
    assert m.feed("more") == ("", True)


def test_partial_prefix_released_when_not_matching():
    m = StopMatcher(["###"])
    assert m.feed("a#") == ("a", False)
    assert m.feed("#") == ("", False)
    assert m.feed("b") == ("##b", False)
    assert m.feed("c##") == ("c", False)
    assert m.flush() == "##"               # end of generation releases what was held


def test_multiple_stops_earliest_wins():
    assert feed_all(StopMatcher(["world", "lo w"]), ["hel", "lo ", "world"]) == ("hel", True)
    assert feed_all(StopMatcher(["xyz", "b"]), ["a", "bc"]) == ("a", True)
    # The stop that completes first wins, however the text is split into pieces.
    for pieces in (["ab", "cd"], ["abcd"], list("abcd")):
        assert feed_all(StopMatcher(["abcd", "c"]), pieces) == ("ab", True)
    # Same end: the one starting first (the longer) wins.
    assert feed_all(StopMatcher(["cd", "bcd"]), ["abcde"]) == ("a", True)


def test_overlapping_prefix_holds_longest():
    m = StopMatcher(["aab"])
    assert m.feed("aaa") == ("a", False)   # "aa" may still begin "aab"
    assert m.feed("b") == ("", True)      # whole output: "a"


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)
    assert StopMatcher(None).feed("x") == ("x", False)
    assert feed_all(StopMatcher("\n"), ["line one", "\nline two"]) == ("line one", True)


def test_stop_list_normalization():
    assert SamplingParams(stop="x").stop_list() == ["x"]
    assert SamplingParams(stop=None).stop_list() == []
    assert SamplingParams(stop=["a", "b"]).stop_list() == ["a", "b"]


# ---- logprobs ----

def test_top_logprobs_values_and_order():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(11)) * 3
    ref = torch.log_softmax(logits.double(), 0)
    got = top_logprobs(logits, 20)
    assert [i for i, _ in got] == torch.topk(ref, 20).indices.tolist()
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:]))
    for i, lp in got:
        assert abs(lp - float(ref[i])) < 1e-5
    full = top_logprobs(logits, 10_000)    # n above V clamps to V
    assert len(full) == 500
    assert abs(sum(math.exp(lp) for _, lp in full) - 1.0) < 1e-5
    assert top_logprobs(logits, 0) == []


def test_sampler_logprobs_ignore_penalties_and_temperature():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(12))
    s = Sampler(SamplingParams(temperature=0.1, repeat_penalty=3.0, presence_penalty=2.0), 100)
    assert s.top_logprobs(logits, 5) == top_logprobs(logits, 5)


def test_token_logprob():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(13))
    ref = torch.log_softmax(logits.double(), 0)
    for t in (0, 17, 99):
        assert abs(token_logprob(logits, t) - float(ref[t])) < 1e-5
    with pytest.raises(HeteroMoEError, match="100"):
        token_logprob(logits, 100)


# ---- validation ----

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.01),
    ("max_tokens", -1), ("max_tokens", 3.0), ("max_tokens", True),
    ("logprobs", 50), ("logprobs", -1), ("repeat_penalty", 0.0), ("repeat_penalty", -1.0),
    ("repeat_last_n", -2), ("top_k", 2.5), ("seed", -1), ("seed", "42"),
    ("frequency_penalty", float("inf")), ("presence_penalty", None), ("echo", "yes"),
])
def test_invalid_values_name_field_and_value(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(SamplingParamError) as e:
        params.validate()
    msg = str(e.value)
    assert f"SamplingParams.{field}=" in msg and repr(value) in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, HeteroMoEError)
    with pytest.raises(SamplingParamError):
        Sampler(params, 10)


@pytest.mark.parametrize("stop", [[1], ["ok", ""], 5, {"a"}])
def test_invalid_stop(stop):
    with pytest.raises(SamplingParamError, match="stop"):
        SamplingParams(stop=stop).validate()


def test_valid_edge_values():
    for kw in (dict(max_tokens=0, echo=True), dict(top_p=1.0), dict(min_p=1.0),
               dict(temperature=0), dict(repeat_last_n=-1), dict(top_k=-5), dict(logprobs=0),
               dict(logprobs=20), dict(seed=0), dict(seed=2**64 - 1), dict(stop=("a", "b"))):
        assert SamplingParams(**kw).validate().max_tokens >= 0


def test_bad_logits_and_history():
    s = Sampler(SamplingParams(repeat_penalty=1.1), 10)
    with pytest.raises(HeteroMoEError, match=r"\[10\]"):
        s.sample(torch.zeros(11), [])
    with pytest.raises(HeteroMoEError, match=r"\[10\]"):
        s.sample(torch.zeros(1, 10), [])
    with pytest.raises(HeteroMoEError, match="NaN"):
        s.sample(torch.full((10,), float("nan")), [])
    with pytest.raises(HeteroMoEError, match="token id 12"):
        s.sample(torch.zeros(10), [1, 12])
    with pytest.raises(SamplingParamError, match="vocab_size"):
        Sampler(SamplingParams(), 0)


def test_accepts_half_logits_and_tensor_history():
    s = Sampler(SamplingParams.greedy(repeat_penalty=2.0), 4)
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float16)
    assert s.sample(logits, torch.tensor([0])) == 1


# ---- against llama.cpp's samplers (skipped when llama_cpp isn't installed) ----

def _llama_apply(lc, samplers, logits: torch.Tensor, accepted=()) -> dict[int, float]:
    """Run llama.cpp samplers in order over logits; returns the surviving {id: logit}."""
    v = logits.numel()
    data = (lc.llama_token_data * v)(*[lc.llama_token_data(i, float(x), 0.0)
                                       for i, x in enumerate(logits.tolist())])
    cur = lc.llama_token_data_array(data=data, size=v, selected=-1, sorted=False)
    for smpl in samplers:
        for t in accepted:
            lc.llama_sampler_accept(smpl, t)
        lc.llama_sampler_apply(smpl, ctypes.byref(cur))
        lc.llama_sampler_free(smpl)
    return {cur.data[i].id: cur.data[i].logit for i in range(cur.size)}


def _llama_penalties(lc, v, last_n, repeat, freq, present):
    try:   # the signature lost its n_vocab argument in later llama.cpp versions
        return lc.llama_sampler_init_penalties(v, last_n, repeat, freq, present)
    except (TypeError, ctypes.ArgumentError):
        return lc.llama_sampler_init_penalties(last_n, repeat, freq, present)


@pytest.mark.parametrize("last_n", [8, 64])
def test_penalties_match_llama_cpp(last_n):
    lc = pytest.importorskip("llama_cpp").llama_cpp
    v = 3000
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(v, generator=g) * 4
    history = torch.randint(0, 200, (150,), generator=g).tolist()
    ref = _llama_apply(lc, [_llama_penalties(lc, v, last_n, 1.3, 0.2, 0.4)], logits, history)
    s = Sampler(plain(repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.4,
                      repeat_last_n=last_n), v)
    ours = s.penalize(logits, history)
    want = torch.tensor([ref[i] for i in range(v)])
    assert torch.allclose(ours, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale,top_k,top_p,min_p", [
    (4.0, 40, 0.95, 0.05), (4.0, 0, 0.9, 0.0), (1.0, 0, 0.95, 0.0), (1.0, 0, 0.8, 0.01),
    (8.0, 100, 0.999, 0.001), (2.0, 500, 0.99, 0.0), (2.0, 0, 1.0, 0.2),
])
def test_filters_match_llama_cpp(scale, top_k, top_p, min_p):
    lc = pytest.importorskip("llama_cpp").llama_cpp
    v = 20_000
    logits = torch.randn(v, generator=torch.Generator().manual_seed(22)) * scale
    chain = []
    if top_k > 0:
        chain.append(lc.llama_sampler_init_top_k(top_k))
    chain += [lc.llama_sampler_init_top_p(top_p, 1), lc.llama_sampler_init_min_p(min_p, 1)]
    ref = set(_llama_apply(lc, chain, logits))
    got = kept_ids(Sampler(plain(top_k=top_k, top_p=top_p, min_p=min_p), v), logits)
    assert got == ref
