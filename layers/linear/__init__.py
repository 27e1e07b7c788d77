"""Causal linear attention (attnax's LINEAR): the spec, the chunkwise-parallel
form (train, prefill) and the recurrent step (decode against a state cache)."""

from meshattn.layers.linear.chunkwise import LinearState, linear_attention, token_runs
from meshattn.layers.linear.recurrent import linear_attention_step
from meshattn.layers.linear.spec import FEATURE_MAPS, POSITIVE_FEATURE_MAPS, LinearSpec

__all__ = ["FEATURE_MAPS", "LinearSpec", "LinearState", "POSITIVE_FEATURE_MAPS",
           "linear_attention", "linear_attention_step", "token_runs"]
