"""Models and tokenizers: a tiny transformers causal LM built from a config (no downloads), loading any local
causal LM, and the training forward that turns (prompt, response) token ids into per-token log π_θ(a_t) and entropy.

The tiny model is a real ``transformers`` Qwen3 (or Llama) with a real ``PreTrainedTokenizerFast``: the default job
runs through exactly the code a local Qwen2.5-Math-1.5B takes (``from_pretrained`` a directory, ``decode``,
``forward`` with an attention mask and position ids); only the sizes differ.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "build_char_tokenizer", "build_tiny_model", "load_model", "ResponseStats", "response_stats",
    "position_ids_from_mask", "DTYPES", "enable_gradient_checkpointing", "training_mode", "decoder_and_head",
    "eos_token_ids", "load_skeleton", "materialize", "has_meta_params",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(alphabet: str, vocab_size: int = 0):
    """A character-level ``PreTrainedTokenizerFast``: one token per character of ``alphabet`` plus
    <pad>=0, <bos>=1, <eos>=2, <unk>=3; encoding prepends <bos>. Built from a ``tokenizers`` WordLevel model, so
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` / ``decode`` behave as for any hub tokenizer.

    ``vocab_size`` > the alphabet's: the vocabulary is padded with tokens ``<x17>``, ``<x18>``, … that no text
    contains (the encoder never produces them) but the model can sample, and that decode to their name: a long
    tail of real logits, as in a 150k-token vocabulary, for the Top-K estimators' "other" cell."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    names = list(SPECIAL_TOKENS) + chars
    names += [f"<x{i}>" for i in range(len(names), vocab_size)]
    vocab = {t: i for i, t in enumerate(names)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a token
    tk.decoder = decoders.Fuse()  # join characters back without separators
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_model(
    vocab_size: int,
    *,
    arch: str = "qwen3",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 128,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
):
    """A randomly initialised transformers causal LM of the given architecture ("qwen3", "qwen2", "llama"),
    built from a config (no weights downloaded); tied input/output embeddings, MLP width 4·H."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        arch, hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        vocab_size=vocab_size, tie_word_embeddings=True, max_position_embeddings=max_positions,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    return AutoModelForCausalLM.from_config(cfg)


def load_model(path: str, dtype: str = "fp32", device: str = "cpu"):
    """``(model, tokenizer)`` from a local directory holding any transformers causal LM and its tokenizer.
    Never touches the network (``local_files_only``). The tokenizer is set to left padding (prompts are
    right-aligned so every response starts at the same column) and gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a directory; pass a local directory with config.json")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype])
    model.to(device)
    model.config.use_cache = False
    return model, tok


def load_skeleton(path: str):
    """``(model, tokenizer)`` as :func:`load_model` gives them, but with every parameter on the meta device (shape
    and dtype, no storage, nothing read or initialised) and the buffers real (rotary frequencies computed from the
    config, on the CPU): the policy of a torchrun process that receives its weights from rank 0
    (:meth:`dppo.run.distributed.Distributed.shard`). Tied parameters stay one parameter; the model's
    ``generation_config.json`` is read as ``from_pretrained`` reads it (its EOS ids end responses)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a directory; pass a local directory with config.json")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    model.config.use_cache = False
    return model, tok


@contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to the meta device as it is registered (before the module's own
    initialisation, which then runs on meta tensors: no compute, no memory); buffers are left where they are
    created. A parameter already on meta (a tied one, registered again) is kept as the same object."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def has_meta_params(model: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def materialize(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Give the meta parameters of ``model`` uninitialised storage on ``device`` (``to_empty``), keeping the values
    of its buffers (moved to ``device``); returns ``model``. Whoever calls it writes every parameter afterwards."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    return model


def enable_gradient_checkpointing(model) -> list[torch.nn.Module]:
    """Turn on transformers' activation checkpointing of every decoder layer, non-reentrant, and return the modules
    that carry the switch (use them with :func:`training_mode`). Works on a plain model or a peft model.

    transformers checkpoints a layer only while ``layer.training`` is set, but the trainer keeps the policy in eval
    mode (no dropout: π must be the same function at rollout and in the loss), so the switch alone does nothing:
    :func:`checkpointing_active` sets the flag on these modules, not their children, around the training forward.
    Non-reentrant checkpointing gives the LoRA parameters inside a checkpointed layer their gradients with no input
    that requires grad, so the hook on the embedding output that transformers adds for the reentrant variant (and
    peft asks for) is removed: with LoRA it would only make the backward run into the frozen embedding for nothing.
    """
    from dppo.hf.lora import base_model

    base = base_model(model)
    kw = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; gradient_* is its deprecated alias
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    mods = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not mods:
        raise ValueError(f"{type(base).__name__} has no module that supports gradient checkpointing")
    return mods


@contextmanager
def training_mode(modules: list[torch.nn.Module]):
    """Within the block, exactly these modules are in training mode (their children keep their own mode): the
    decoder layers returned by :func:`enable_gradient_checkpointing`, so a forward with grad checkpoints every
    layer, and LoRA's dropout modules when LoRA dropout is on. The backward may run after the block: the recompute
    calls the layer's forward directly and reads no ``training`` flag of the layer itself."""
    before = [m.training for m in modules]
    for m in modules:
        m.training = True
    try:
        yield
    finally:
        for m, t in zip(modules, before):
            m.training = t


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token is position 0 (what HF ``generate`` does too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ResponseStats:
    """Per response token, from one forward pass of the policy. Shapes [N, T] (``gathered_logp`` [N, T, K])."""

    logp: Tensor  # log π_θ(a_t | s_t) at temperature τ, fp32, differentiable
    entropy: Tensor | None  # H(π_θ(·|s_t)), fp32 (no grad kept unless asked)
    gathered_logp: Tensor | None  # log π_θ at the rollout's top-K ids, fp32


def decoder_and_head(model):
    """(decoder body returning final normed hidden states, lm-head Linear) or None when the model does anything to
    its logits beyond ``h·Wᵀ + b`` (:func:`dppo.hf.logit_transform`: Gemma-style soft-capping, Cohere/Granite-style
    scaling) or has no plain Linear head (then the logits path is used)."""
    from dppo.hf.heads import decoder, logit_transform

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or logit_transform(model) is not None:
        return None
    try:
        return decoder(model), head
    except ValueError:
        return None


def can_share_prompts(model) -> bool:
    """Whether :func:`response_hidden_states` can run each prompt once for all its responses: a decoder body with a
    plain head (:func:`decoder_and_head`), full attention in every layer (a sliding window would see a different
    context through a cache), and no gradient checkpointing (transformers switches the cache off under it)."""
    parts = decoder_and_head(model)
    if parts is None:
        return False
    cfg = getattr(model, "config", None)
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        if getattr(cfg, "layer_types", None) is None:
            return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in parts[0].modules())


def response_hidden_states(body, input_ids: Tensor, attention_mask: Tensor, n_response: int,
                           prompt_index: Tensor | None = None) -> Tensor:
    """[N, T, H] final hidden states at the positions that predict the T response tokens (position P+t−1 predicts
    response token t), from the decoder ``body`` (:func:`decoder_and_head`).

    With ``prompt_index`` ([N] int: rows with the same index have the same prompt, e.g. the G samples of a group),
    each distinct prompt runs once and its responses attend to that one prompt KV cache, expanded to them by
    indexing (differentiable: the prompt's gradient accumulates from all its responses). Exact — the same attention
    over [prompt | response] — and it removes (G−1)/G of the prompt compute when a micro-batch holds whole groups.
    Only for models where :func:`can_share_prompts` holds."""
    t = n_response
    p = input_ids.shape[1] - t
    pos = position_ids_from_mask(attention_mask)
    if prompt_index is None:
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).last_hidden_state
        return hidden[:, -t - 1: -1]
    from transformers import DynamicCache

    uniq, inverse = torch.unique(prompt_index, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long, device=input_ids.device).scatter_(
        0, inverse, torch.arange(len(inverse), device=input_ids.device))  # one row per distinct prompt
    cfg = getattr(body, "config", None)
    out = body(input_ids=input_ids[first, :p], attention_mask=attention_mask[first, :p], position_ids=pos[first, :p],
               use_cache=True, **{_cache_kw(body): DynamicCache(config=cfg)})
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    expanded = DynamicCache([(layer.keys[inverse], layer.values[inverse]) for layer in cache.layers], config=cfg)
    resp = body(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=pos[:, p:], use_cache=True,
                **{_cache_kw(body): expanded}).last_hidden_state
    return torch.cat([out.last_hidden_state[inverse, -1:], resp[:, :-1]], dim=1)


def _cache_kw(module) -> str:
    """Name of the KV-cache keyword of ``module.forward`` (transformers ≥ 5.2x renamed past_key_values → cache)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def response_stats(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_ids: Tensor,
    *,
    temperature: float,
    gather_ids: Tensor | None = None,
    entropy: bool = True,
    autocast_dtype: torch.dtype | None = None,
    prompt_index: Tensor | None = None,
) -> ResponseStats:
    """log π_θ(a_t), entropy and (optionally) log π_θ at ``gather_ids`` for the last T tokens of each row.

    ``input_ids`` = [left-padded prompt (P) | response (T), right-padded]; the logits predicting response token t sit
    at position P+t−1. The per-token statistics come from :func:`dppo.token_stats.token_stats` on the final hidden
    states and the lm-head weight (no [N, T, V] fp32 logits materialised; log-sum-exp in fp32), or from the logits
    when the model post-processes them.

    Args:
        input_ids, attention_mask: [N, P+T].
        response_ids: [N, T] the sampled tokens (pads anywhere the response mask is 0 are harmless).
        temperature: τ; statistics are those of softmax(z/τ), the distribution the rollout sampled from.
        gather_ids: [N, T, K] rollout top-K ids (Top-K methods) or None.
        prompt_index: [N] rows with equal values share their prompt: it runs once (:func:`response_hidden_states`)
            where :func:`can_share_prompts` allows; ignored otherwise.
    """
    from dppo.token_stats import token_stats, token_stats_from_logits

    t = response_ids.shape[1]
    ctx = torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    parts = decoder_and_head(model)
    with ctx:
        if parts is not None:
            body, head = parts
            share = prompt_index if prompt_index is not None and can_share_prompts(model) else None
            hidden = response_hidden_states(body, input_ids, attention_mask, t, share)
            w = head.weight
            b = head.bias
            if hidden.dtype != w.dtype:  # autocast leaves the final norm in fp32; run the head GEMM in the weight dtype
                hidden = hidden.to(w.dtype)
            st = token_stats(hidden, w, response_ids, bias=b, temperature=temperature, gather_ids=gather_ids,
                             entropy=entropy)
        else:
            pos = position_ids_from_mask(attention_mask)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
            st = token_stats_from_logits(logits[:, -t - 1 : -1], response_ids, temperature=temperature,
                                         gather_ids=gather_ids, entropy=entropy)
    return ResponseStats(logp=st.logp, entropy=st.entropy, gathered_logp=st.gathered_logp)



def eos_token_ids(model, tok, extra: tuple[str, ...] = ()) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, the model's ``generation_config.eos_token_id`` (an int or
    a list), the chat template's end-of-turn token (found by rendering a one-turn conversation and taking the first
    special token after the assistant's text, e.g. ``<|im_end|>`` for Qwen), and each string of ``extra`` (which
    must be a single token of the tokenizer)."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    if getattr(tok, "chat_template", None):
        ids.add(_end_of_turn_id(tok))
    for s in extra:
        tid = tok.convert_tokens_to_ids(s)
        if tid is None or tid == tok.unk_token_id:
            enc = tok(s, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"--eos_tokens {s!r} is not one token of the tokenizer (it encodes to {enc})")
            tid = enc[0]
        ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _end_of_turn_id(tok) -> int | None:
    marker = "dppoXq7"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "1"}, {"role": "assistant", "content": marker}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation has no usable end-of-turn
        return None
    tail = text.split(marker, 1)[1] if marker in text else ""
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for tid in tok(tail, add_special_tokens=False)["input_ids"]:
        if tid in special:
            return tid
    return None
