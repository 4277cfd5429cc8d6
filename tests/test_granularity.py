"""Granularity as one base type: block and scale shapes, the reported block size, and the one
rule combining a granularity text with a block size (CLI and recipes)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ox_quant.core.config import (
    DEFAULT_BLOCK_SIZE,
    Block,
    ChannelGroup,
    PerChannel,
    PerTensor,
    resolve_granularity,
)
from ox_quant.errors import OxQuantError

GRANULARITIES = st.one_of(
    st.just(PerTensor()),
    st.just(PerChannel()),
    st.integers(1, 64).map(Block),
    st.integers(1, 64).map(ChannelGroup),
)


@given(GRANULARITIES, st.integers(1, 200), st.integers(1, 200))
def test_scale_shape_counts_the_blocks(g, k, n):
    rows, cols = g.block_shape(k, n)
    assert g.scale_shape(k, n) == (math.ceil(k / rows), math.ceil(n / cols))


def test_reported_block_sizes():
    assert [g.block_size for g in (PerTensor(), PerChannel(), Block(32), ChannelGroup(4))] == [None, -1, 32, 4]
    assert [g.k_block for g in (PerTensor(), PerChannel(), Block(32), ChannelGroup(4))] == [None, None, 32, None]
    assert [g.n_group for g in (PerTensor(), PerChannel(), Block(32), ChannelGroup(4))] == [None, None, None, 4]


def test_misfit():
    assert Block(64).misfit(32, 8) == "block size 64 is larger than K=32"
    assert ChannelGroup(16).misfit(32, 8) == "channel-group size 16 is larger than N=8"
    assert Block(32).misfit(32, 8) is None and PerTensor().misfit(1, 1) is None


@pytest.mark.parametrize(
    ("text", "block", "expected"),
    [
        (None, None, Block(DEFAULT_BLOCK_SIZE)),
        (None, 64, Block(64)),
        (None, -1, PerChannel()),
        ("block", None, Block(DEFAULT_BLOCK_SIZE)),
        ("block", -1, PerChannel()),
        ("block:32", 64, Block(32)),
        ("channel-group", 8, ChannelGroup(8)),
        ("channel", -1, PerChannel()),
        ("tensor", None, PerTensor()),
    ],
)
def test_resolve_granularity(text, block, expected):
    assert resolve_granularity(text, block) == expected


def test_resolve_granularity_default_and_errors():
    assert resolve_granularity("block", None, default_size=32) == Block(32)
    with pytest.raises(OxQuantError, match="block_size applies to block and channel-group granularity, not tensor"):
        resolve_granularity("tensor", 32, option="block_size")
