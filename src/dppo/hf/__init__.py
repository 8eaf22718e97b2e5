"""Hugging Face transformers glue: the lm head and final hidden states of a causal LM (:mod:`dppo.hf.heads`), model
and tokenizer loading and the training forward (:mod:`dppo.hf.model`), LoRA through peft (:mod:`dppo.hf.lora`)."""

from dppo.hf.heads import causal_lm_token_stats, decoder, final_hidden_states, lm_head, logit_transform

__all__ = ["lm_head", "decoder", "logit_transform", "final_hidden_states", "causal_lm_token_stats"]
