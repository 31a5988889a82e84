"""Needle in a haystack with SmolLM2 at a small scale: with a selection so tight that half of the
prompt is out of reach (6 blocks of 32 tokens, counting the first and the current one, + a
64-token window, out of ~500 tokens), sparse attention must still find the blocks holding the
needle and answer like dense attention.
The full-size run (2k-8k tokens, default settings) is benchmarks/needle_sparse.py."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from needle_sparse import ANSWER, build_prompt, filler_sentences

from hetero_moe.layers.sparse_attn import SparseAttnConfig

TIGHT = SparseAttnConfig(mode="approx", sel_block=32, top_n=6, n_init=1, n_local=1, window=64,
                         min_len=256)


@pytest.fixture(scope="module")
def smol(smollm2):
    import hetero_moe
    return hetero_moe.load(smollm2, n_ctx=640)


@pytest.mark.parametrize("prefill", ["dense", "sparse"])
def test_needle_found_by_sparse_where_dense_finds_it(smol, prefill):
    ids = build_prompt(smol, 500, 0.4, filler_sentences(400))
    reach = TIGHT.top_n * TIGHT.sel_block + TIGHT.window
    assert len(ids) > reach + 200               # much of the prompt is outside the selection
    dense = smol.generate(ids, max_tokens=20, temperature=0, sparse_attn="off")
    assert ANSWER in dense.text, dense.text
    sparse = smol.generate(ids, max_tokens=20, temperature=0,
                           sparse_attn=TIGHT.with_(prefill=prefill))
    assert ANSWER in sparse.text, sparse.text
    # the needle is far outside the window: it was reached through block selection
    needle_at = next(i for i in range(len(ids)) if smol.detokenize(ids[:i]).count("7-4") == 1)
    assert needle_at < len(ids) - TIGHT.window - 2 * TIGHT.sel_block
