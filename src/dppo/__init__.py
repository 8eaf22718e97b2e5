"""dppo: divergence-based trust regions for RL fine-tuning of LLMs (DPPO, arXiv 2602.04879) and its baselines."""

from dppo.advantages import group_advantages
from dppo.fused import policy_loss_from_hidden
from dppo.loss import TopK, aggregate, aggregation_denominator, aggregation_weights, policy_loss
from dppo.methods import PRESETS, Method, get_method
from dppo.token_loss import TokenContext, TokenTerms, token_loss
from dppo.token_stats import TokenStats, token_stats, token_stats_from_logits

__all__ = ["Method", "PRESETS", "get_method", "policy_loss", "policy_loss_from_hidden", "TopK", "aggregate",
           "aggregation_denominator", "aggregation_weights", "token_loss", "TokenContext", "TokenTerms",
           "group_advantages", "TokenStats", "token_stats", "token_stats_from_logits"]
__version__ = "0.1.0"
