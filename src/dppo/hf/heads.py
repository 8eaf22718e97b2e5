"""Final hidden states and lm-head parameters of a Hugging Face transformers causal LM, without its logits.

``model(input_ids).logits`` materialises [B, T, V] (and its fp32 upcast in the loss). ``dppo.token_stats`` only
needs the input of the lm-head, h = the transformer body's output after its final norm, and the head's weight/bias:

    logits = h · Wᵀ + b,    h: [B, T, H] (model dtype),  W: [V, H],  b: [V] or None

For tied embeddings (``tie_word_embeddings=True``, e.g. small Qwen3 models) W *is* the input-embedding Parameter,
so gradients through ``token_stats`` accumulate into that one Parameter exactly as they do through ``lm_head``.
Models whose logits are not plain h·Wᵀ + b (soft-capping, logit scaling) are refused with the config field named.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dppo.token_stats import TokenStats, token_stats

__all__ = ["lm_head", "decoder", "logit_transform", "final_hidden_states", "causal_lm_token_stats"]

# Config fields that change logits after the lm-head GEMM, with the value for which they are a no-op.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-cap
    "logit_softcapping": None,
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "logit_scale": None,  # Cohere: logits * logit_scale
}


def logit_transform(model: nn.Module) -> str | None:
    """``"config.<field>=<value>"`` for the first config field by which ``model`` changes its logits after the
    lm-head GEMM (soft-capping, scaling), or None when its logits are plain h·Wᵀ + b."""
    cfg = getattr(model, "config", None)
    for field, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(cfg, field, neutral)
        if value is not None and value != neutral:
            return f"config.{field}={value!r}"
    return None


def lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) of ``model``'s output embedding; the tied embedding Parameter if tied."""
    transform = logit_transform(model)
    if transform is not None:
        raise NotImplementedError(
            f"{type(model).__name__} applies {transform} to its logits after the lm-head; "
            "token_stats assumes logits = h·Wᵀ + b"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) with a weight; not a causal LM?")
    bias = getattr(head, "bias", None)
    return head.weight, bias if isinstance(bias, Tensor) else None


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (``get_decoder()``, else the ``base_model_prefix`` submodule, e.g.
    ``Qwen3Model``): called like the model, it returns the final normed hidden states instead of logits."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None:
        raise ValueError(f"cannot find the transformer body of {type(model).__name__} (get_decoder/base_model_prefix)")
    return body


def final_hidden_states(
    model: nn.Module, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any
) -> Tensor:
    """[B, T, H] output of the transformer body (after its final norm): the lm-head's input, no logits computed.

    Runs :func:`decoder` instead of the full causal-LM forward; extra ``kwargs`` (position_ids, inputs_embeds, ...)
    are passed through. Needs grad as usual.
    """
    kwargs.setdefault("use_cache", False)
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def causal_lm_token_stats(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    topk: int = 0,
    gather_ids: Tensor | None = None,
    chunk_size: int | None = None,
    entropy: bool = True,
    **model_kwargs: Any,
) -> TokenStats:
    """``token_stats`` of the next token at every position: position t (< T−1) scores ``input_ids[:, t+1]``.

    Args:
        input_ids: [B, T]; attention_mask: [B, T] or None. Returned statistics are [B, T−1] (position t predicts
            token t+1, as ``logits[:, :-1]`` against ``input_ids[:, 1:]``); ``gather_ids`` must be [B, T−1, K'].
        The rest as in :func:`dppo.token_stats.token_stats`.
    """
    hidden = final_hidden_states(model, input_ids, attention_mask, **model_kwargs)[:, :-1]
    weight, bias = lm_head(model)
    if hidden.dtype != weight.dtype:  # e.g. an fp32 head kept beside a bf16 body: run the head GEMM in its dtype
        hidden = hidden.to(weight.dtype)
    return token_stats(
        hidden, weight, input_ids[:, 1:], bias=bias, temperature=temperature, topk=topk, gather_ids=gather_ids,
        chunk_size=chunk_size, entropy=entropy,
    )
