"""Causal linear attention (attnax's LINEAR): the spec, the chunkwise-parallel
form (train, prefill) and the recurrent step (decode against a state cache)."""

from meshattn.layers.linear.chunkwise import LinearState, linear_attention, token_runs
from meshattn.layers.linear.recurrent import linear_attention_step
from meshattn.layers.linear.spec import FEATURE_MAPS, POSITIVE_FEATURE_MAPS, LinearSpec
from meshattn.layers.linear.steps import linear_cached_step, linear_train

__all__ = ["FEATURE_MAPS", "LinearSpec", "LinearState", "POSITIVE_FEATURE_MAPS",
           "linear_attention", "linear_attention_step", "linear_cached_step", "linear_train",
           "token_runs"]
