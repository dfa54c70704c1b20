"""Tuning of the decode kernel: its search space, its key, and ``triton-attn tune --kind decode``."""

from __future__ import annotations

import warnings

import pytest
import torch

import triton_attn as ta
from triton_attn import cli
from triton_attn.kernels.tuning.cache import TuningCache
from triton_attn.kernels.tuning.search import TuningKey, search_space
from triton_attn.masks import causal_mask

pytest.importorskip("triton")

from triton_attn.kernels.decode.configs import choose_splits  # noqa: E402
from triton_attn.kernels.decode.launch import plan_decode  # noqa: E402
from triton_attn.kernels.tuned import decode_candidates, decode_key  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_ATTN_AUTOTUNE", raising=False)


def test_search_space_and_candidates_fit_the_packed_rows():
    space = search_space("decode", 90, head_dim=128, dtype=torch.bfloat16)
    assert {c.BLOCK_M for c in space} == {16, 64} and {c.num_stages for c in space} == {2, 3, 4}
    query = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 1, 4096)
    mha = decode_candidates(90, query, 128, block_mask, groups=1)
    assert {c.BLOCK_M for c in mha} == {16} and len(mha) == len(set(mha)) == len(space) // 2
    packed = decode_candidates(90, torch.randn(1, 32, 8, 128, dtype=torch.bfloat16), 128,
                               ta.create_block_mask(causal_mask, None, None, 8, 4096), groups=8)
    assert {c.BLOCK_M for c in packed} == {16, 64}


def test_key_holds_split_count_paging_and_score():
    query = torch.randn(2, 32, 4, 128, dtype=torch.float16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 4, 4096)
    key = decode_key(query, 8, 4096, 128, block_mask, 6, paged=True, score=True)
    assert str(key).startswith("decode|cpu|sm0|float16|d128|dv128|gqa4|q16|kv4096|")
    assert key.variant == "splits6.paged.score" and TuningKey.parse(str(key)) == key
    assert key.block == "128x128" and key.ragged and key.occupancy == 64


def test_split_count_follows_sms_and_non_empty_blocks():
    assert choose_splits(programs=8, max_visits=32, sm_count=132) == 32   # 2 waves of 132 SMs, capped by blocks
    assert choose_splits(programs=8, max_visits=100, sm_count=132) == 33
    assert choose_splits(programs=512, max_visits=100, sm_count=132) == 1  # enough programs already
    query = torch.randn(1, 32, 1, 128)
    window = ta.create_block_mask(lambda b, h, q, kv: (q + 4095 - kv < 512) & (q + 4095 >= kv), None, None, 1, 4096)
    assert plan_decode(query, 8, 128, window, sm_count=132).num_splits == 4  # keys 3584..4095: 4 blocks of 128


def test_cli_tune_kind_decode_under_the_interpreter_stores_a_decode_winner(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["tune", "--kind", "decode", "--interpret", "--mask", "causal", "--seq-len", "200",
                         "--head-dim", "16", "--dtype", "fp16", "--heads", "4", "--kv-heads", "2", "--q-len", "2",
                         "--max-configs", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Lq=2" in out and "winners stored in" in out
    entries = list(TuningCache().entries())
    assert len(entries) == 1 and entries[0].startswith("decode|cpu|sm0|float16|d16|dv16|gqa2|q16|kv256|")
    assert "|splits" in entries[0]
