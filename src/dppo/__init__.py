"""dppo: divergence-based trust regions for RL fine-tuning of LLMs (DPPO, arXiv 2602.04879) and its baselines."""

from dppo.advantages import group_advantages
from dppo.aggregation import aggregate, aggregation_denominator, aggregation_weights
from dppo.fused import policy_loss_from_hidden
from dppo.loss import TopK, policy_loss
from dppo.methods import PRESETS, Method, get_method, method_from_spec
from dppo.parts import (
    DRPO, IS, PG, BehaviorWeight, DivergenceMask, GammaWeight, LogRatioPenalty, NoMask, OffPolicySequenceMask,
    PPOClip, RatioMask, SequenceMask,
)
from dppo.token_loss import TokenContext, TokenTerms, token_loss
from dppo.token_stats import TokenStats, token_stats, token_stats_from_logits

__all__ = ["Method", "PRESETS", "get_method", "method_from_spec", "policy_loss", "policy_loss_from_hidden", "TopK",
           "aggregate", "aggregation_denominator", "aggregation_weights", "token_loss", "TokenContext", "TokenTerms",
           "group_advantages", "TokenStats", "token_stats", "token_stats_from_logits",
           # the parts a Method is built from (dppo.parts)
           "NoMask", "RatioMask", "DivergenceMask", "IS", "PPOClip", "DRPO", "PG", "BehaviorWeight", "SequenceMask",
           "OffPolicySequenceMask", "GammaWeight", "LogRatioPenalty"]
__version__ = "0.1.0"
