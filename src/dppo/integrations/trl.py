"""DPPO inside TRL's ``GRPOTrainer``: the loss is :func:`dppo.policy_loss`, everything else stays TRL's.

    from dppo.integrations.trl import DPPOConfig, DPPOTrainer

    trainer = DPPOTrainer(model=..., reward_funcs=..., args=DPPOConfig(method="dppo-binary-tv", ...),
                          train_dataset=..., processing_class=...)   # GRPOTrainer's own constructor

What is overridden (TRL 1.16.0, the version tested; :data:`TESTED_TRL`), and the private members still relied on
(:data:`PRIVATE_TRL`, each checked by the drift tests in tests/test_integration_trl.py):

* ``compute_loss`` (public): log π from TRL's own forward (``_get_per_token_logps_and_entropies``; for Top-K presets
  one forward that also gives log π at the rollout's top-K ids), then ``dppo.policy_loss(method, log π, log μ, Â,
  mask)`` with μ = TRL's ``sampling_per_token_logps``, the log-prob of every sampled token under the distribution
  that sampled it: the anchor of every method in the paper (§5.2, App. E) and the denominator of its IS weight
  (Eq. 23). TRL's own vLLM importance-sampling correction is never applied (dppo's weight min(π/μ, C) is it).
* ``_generate_and_score_completions`` (private, Top-K presets only): TRL's, then the rollout's top-K
  (``rollout_topk_ids`` / ``rollout_topk_logp``, returned by the rollout function as extra fields, which TRL hands to
  the reward functions only) padded to [B, T, K] and added to the batch; TRL's ``_prepare_inputs`` then shuffles and
  splits them with the rest.

Where μ comes from (``DPPOConfig.rollout_engine``; every combination that cannot give the rollout's μ is refused
when the trainer is built, before any engine starts):

* ``"hf"`` (the default without vLLM): :func:`hf_rollout`, dppo's HF decode loop on the trainer's own model;
* ``"vllm"``: :class:`VLLMRollout`, dppo's :class:`~dppo.engines.vllm.VLLMEngine` colocated in the trainer's
  process, synced from the trainer's weights before each generation (all presets, Top-K included);
* ``use_vllm=True``: TRL's own vLLM (binary and ratio presets: it keeps the sampled token's log-prob only). A server
  must report ``logprobs_mode == "processed_logprobs"`` (asked through TRL's ``VLLMClient.get_server_info``); TRL's
  colocate mode is refused where its weight sync cannot work (vLLM's CPU backend);
* your own ``rollout_func`` returning ``logprobs`` (and the two top-K fields for Top-K presets).

A batch without μ is refused: anchoring to the recomputed π_old instead is a different method (the paper's
"decoupled" ablation, Fig. 4), available as such (``dppo-binary-tv-recompute``, ``minirl``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("dppo.integrations.trl needs TRL: pip install -e '.[trl]' in a dppo clone") from e

import dppo
from dppo.engines import HFEngine
from dppo.hf.model import DTYPES
from dppo.methods import Method, method_from_spec
from dppo.rollout import Rollout, SamplingParams

__all__ = ["DPPOConfig", "DPPOTrainer", "hf_rollout", "VLLMRollout", "server_logprobs_mode", "TESTED_TRL",
           "TOPK_FIELDS", "PRIVATE_TRL", "ROLLOUT_ENGINES"]

TESTED_TRL = ("1.16.0",)  # every TRL release the tests ran on (the newest on the registry when this was written)
TOPK_FIELDS = ("rollout_topk_ids", "rollout_topk_logp")  # extra rollout_func fields: per completion [T_i, K]
ROLLOUT_ENGINES = ("auto", "hf", "vllm")
# GRPOTrainer's private members that DPPOTrainer overrides or calls (the drift tests check each one)
PRIVATE_TRL = ("_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_tokenize_prompts",
               "_metrics")

if trl.__version__ not in TESTED_TRL:
    warnings.warn(f"dppo.integrations.trl was tested with TRL {', '.join(TESTED_TRL)}, found {trl.__version__}: it "
                  f"relies on GRPOTrainer's private {', '.join(PRIVATE_TRL)}; run tests/test_integration_trl.py (its "
                  "drift guard) against this TRL", stacklevel=2)

# GRPOConfig options that GRPOTrainer's loss reads and dppo's loss replaces: a value other than TRL's default is
# refused (it would be silently ignored), with what to use instead.
_REPLACED = {
    "loss_type": ("dapo", "the loss is dppo's `method` (a preset name, see dppo.PRESETS; TRL's 'vespo' is preset "
                          "'vespo')"),
    "epsilon": (0.2, "set delta_low / delta_high (they are ε for the ratio presets grpo, minirl, relax-*)"),
    "epsilon_high": (None, "set delta_high"),
    "delta": (None, "set ratio_cap (C in min(π/μ, C))"),
    "importance_sampling_level": ("token", "dppo's trust regions are per token (TRM's sequence mask is preset 'trm')"),
    "beta": (0.0, "dppo's loss has no KL-to-reference term (the paper uses none, §5.1)"),
    "top_entropy_quantile": (1.0, "dppo's loss has no entropy mask"),
    "entropy_coef": (0.0, "dppo's loss has no entropy bonus"),
    "use_adaptive_entropy": (False, "dppo's loss has no entropy bonus"),
    "off_policy_mask_threshold": (None, "this mask is preset 'offpolicy-seq-mask' (δ: method="
                                  "'offpolicy-seq-mask@gates.offpolicy.delta=…'), or add gates.offpolicy.delta=… to "
                                  "any preset's spec"),
    "vllm_importance_sampling_correction": (
        False, "dppo applies its own IS weight min(π/μ, C) against μ (Eq. 23); TRL's would weight the loss twice"),
    "use_transformers_continuous_batching": (False, "its generate_batch returns no log-probs, so μ would be missing"),
}


@dataclass
class DPPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the dppo method and where μ comes from. Every other option means what it means in TRL,
    except the loss options listed in ``_REPLACED`` (refused when set, with what to use instead).

    ``vllm_importance_sampling_correction`` defaults to False here: dppo's loss weights every token by
    min(π/μ, C) against the rollout μ itself (Eq. 23), so TRL's correction would be applied on top of it.
    """

    method: str = field(default="dppo-binary-tv", metadata={
        "help": "dppo preset name (dppo.PRESETS), optionally with overrides: NAME@field=value,... "
                "(e.g. 'kpop@penalty.coef=1e-3')"})
    delta_low: float | None = field(default=None, metadata={"help": "override δ of the negative side (ε for ratio)"})
    delta_high: float | None = field(default=None, metadata={"help": "override δ of the positive side"})
    ratio_cap: float | None = field(default=None, metadata={"help": "override the IS cap C (inf = none)"})
    topk: int | None = field(default=None, metadata={"help": "override K of the Top-K presets (20 in the paper)"})
    aggregation: str | None = field(default=None, metadata={"help": "override the aggregation (dppo.loss.aggregate)"})
    vllm_importance_sampling_correction: bool = field(default=False, metadata={"help": "must stay False"})
    rollout_engine: str = field(default="auto", metadata={
        "help": "who samples and records μ: 'hf' (dppo's HF decode loop on the trainer's model), 'vllm' (dppo's "
                "vLLM engine in this process, synced from the trainer; every preset), or 'auto': TRL's vLLM when "
                "use_vllm=True, else 'hf'"})
    vllm_enforce_eager: bool = field(default=False, metadata={
        "help": "rollout_engine='vllm': no CUDA graphs / torch.compile (a start of seconds instead of ~25 s on CPU)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, (default, instead) in _REPLACED.items():
            if getattr(self, name) != default:
                raise ValueError(f"DPPOConfig: {name}={getattr(self, name)!r} is a GRPOTrainer loss option that dppo's "
                                 f"loss replaces; leave it at {default!r}: {instead}")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(f"DPPOConfig: rollout_engine={self.rollout_engine!r}, expected one of {ROLLOUT_ENGINES}")
        if self.use_vllm and self.rollout_engine != "auto":
            raise ValueError(f"DPPOConfig: use_vllm=True starts TRL's vLLM, rollout_engine={self.rollout_engine!r} "
                             "another sampler: set one of them (rollout_engine='vllm' is dppo's vLLM engine)")
        self.dppo_method  # validate the overrides now, not at the first step

    @property
    def dppo_method(self) -> Method:
        """The preset with this config's overrides. ``seq-mean-token-sum-norm`` divides by L = max_completion_length
        (Dr.GRPO's constant, as TRL's ``dr_grpo``; *ours*: the preset's None means the batch's T), so that the
        micro-batch losses of an accumulation window add up to the window's loss whatever their padded lengths."""
        keys = ("delta_low", "delta_high", "ratio_cap", "topk", "aggregation")
        over = {k: v for k in keys if (v := getattr(self, k)) is not None}
        m = method_from_spec(self.method, **over)
        if m.aggregation == "seq-mean-token-sum-norm" and m.max_len_norm is None:
            m = dataclasses.replace(m, max_len_norm=self.max_completion_length)
        return m

    @property
    def dppo_rollout(self) -> str:
        """The sampler actually used: "hf", "vllm" (dppo's engine) or "trl-vllm" (TRL's own)."""
        if self.use_vllm:
            return "trl-vllm"
        return "hf" if self.rollout_engine == "auto" else self.rollout_engine


def _unwrapped(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def _tokenizer(trainer):
    return getattr(trainer.processing_class, "tokenizer", trainer.processing_class)


def _tokenized(prompts: list, trainer) -> tuple[list[list[int]], Tensor, Tensor]:
    """The prompts as TRL tokenises them (``_tokenize_prompts``: chat template, tools, ``chat_template_kwargs``),
    also left-padded to [N, P] ids and mask."""
    prompt_ids, images, mm = trainer._tokenize_prompts(prompts)
    if images is not None or mm:
        raise ValueError("dppo's rollout engines take text prompts only; pass a rollout_func for multimodal prompts")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), _tokenizer(trainer).pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return prompt_ids, ids, mask


def _sampling_params(args: DPPOConfig) -> SamplingParams:
    method = args.dppo_method
    return SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                          top_k=args.top_k or 0, top_p=args.top_p,
                          record_topk=method.topk if method.needs_topk else 0)


def _rollout_output(prompt_ids: list[list[int]], ro: Rollout) -> dict:
    """A dppo :class:`Rollout` as TRL's ``rollout_func`` returns it, plus the top-K fields when recorded."""
    lengths = ro.response_mask.sum(-1).tolist()
    out = {"prompt_ids": prompt_ids,
           "completion_ids": [ro.response_ids[i, :n].tolist() for i, n in enumerate(lengths)],
           "logprobs": [ro.rollout_logp[i, :n].tolist() for i, n in enumerate(lengths)]}
    if ro.rollout_topk_ids is not None:
        out["rollout_topk_ids"] = [ro.rollout_topk_ids[i, :n].cpu() for i, n in enumerate(lengths)]
        out["rollout_topk_logp"] = [ro.rollout_topk_logp[i, :n].cpu() for i, n in enumerate(lengths)]
    return out


def hf_rollout(prompts: list, trainer: GRPOTrainer) -> dict:
    """A TRL ``rollout_func`` backed by :class:`dppo.engines.HFEngine`: one completion per prompt (TRL's sampler has
    already repeated every prompt ``num_generations`` times), sampled with the trainer's model in its own dtype, with
    log μ of every sampled token and, for Top-K methods, μ's top-K ids and log-probs (``TOPK_FIELDS``).

    μ is the distribution sampled from: softmax(z/τ), truncated by top_k / top_p and renormalised (dppo.rollout).
    The unwrapped model samples: one device or DDP, not sharded training (FSDP, ZeRO-3 would sample with a shard).
    """
    _refuse_unrecordable_sampling(trainer.args)
    prompt_ids, ids, mask = _tokenized(prompts, trainer)
    model = _unwrapped(trainer)
    dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
    was_training = model.training
    try:  # the engine samples with the policy module itself (same dtype): eval mode, no copy
        engine = HFEngine(model, eos_token_id=trainer.eos_token_ids, pad_token_id=_tokenizer(trainer).pad_token_id,
                          dtype=dtype)
        dev = next(model.parameters()).device
        ro = engine.generate(ids.to(dev), mask.to(dev), _sampling_params(trainer.args))
    finally:
        model.train(was_training)
    return _rollout_output(prompt_ids, ro)


class VLLMRollout:
    """A TRL ``rollout_func`` backed by :class:`dppo.engines.vllm.VLLMEngine`: vLLM in the trainer's process,
    loaded from the model's directory, then synced from the trainer's weights (vLLM's ``reload_weights``) before the
    first generation and whenever the trainer's step has changed since the last sync, as TRL syncs its own vLLM.

    log μ(a_t) is read from a_t's own entry of vLLM's processed log-probs (never the top-1 entry), and for Top-K
    presets μ's top-K ids and log-probs are recorded (K = the method's, ≤ ``max_logprobs`` = max(20, K)).
    ``DPPOConfig(rollout_engine="vllm")`` builds one; pass ``VLLMRollout(engine)`` as ``rollout_func`` to share an
    engine (e.g. across trainers of one process). ``close()`` frees the engine.
    """

    def __init__(self, engine=None):
        self.engine = engine
        self.synced = None  # (id of the model, trainer step) of the last sync
        self.generator: torch.Generator | None = None

    def start(self, trainer) -> None:
        """Build the engine for ``trainer`` (no-op if it has one)."""
        if self.engine is None:
            from dppo.engines.vllm import VLLMEngine

            args, model = trainer.args, _unwrapped(trainer)
            path = getattr(model.config, "_name_or_path", "")
            if not path or not os.path.isdir(path):  # built in memory: vLLM loads from a directory
                path = tempfile.mkdtemp(prefix="dppo-vllm-")
                model.save_pretrained(path)
            method = args.dppo_method
            dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
            self.engine = VLLMEngine(
                path, eos_token_id=trainer.eos_token_ids, pad_token_id=_tokenizer(trainer).pad_token_id, dtype=dtype,
                max_logprobs=max(20, method.topk if method.needs_topk else 0),
                max_model_len=args.vllm_max_model_length or 0,
                max_num_seqs=args.per_device_train_batch_size * args.steps_per_generation,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization, enforce_eager=args.vllm_enforce_eager,
                seed=args.seed)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(trainer.args.seed + trainer.accelerator.process_index)

    def __call__(self, prompts: list, trainer) -> dict:
        _refuse_unrecordable_sampling(trainer.args)
        self.start(trainer)
        model = _unwrapped(trainer)
        if self.synced != (id(model), trainer.state.global_step):
            self.engine.sync(model)
            self.synced = (id(model), trainer.state.global_step)
        prompt_ids, ids, mask = _tokenized(prompts, trainer)
        ro = self.engine.generate(ids, mask, _sampling_params(trainer.args), generator=self.generator)
        return _rollout_output(prompt_ids, ro)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _refuse_unrecordable_sampling(args) -> None:
    if args.min_p is not None or args.repetition_penalty != 1.0 or args.generation_kwargs:
        raise ValueError("dppo's rollout engines sample from softmax(z/τ) with top_k/top_p only; min_p, "
                         "repetition_penalty and generation_kwargs would change the sampling distribution away from "
                         "the recorded μ")


def server_logprobs_mode(args) -> str:
    """The ``logprobs_mode`` of the vLLM server that ``args`` points to, from its ``/server_info`` (TRL's
    ``VLLMClient.get_server_info``; the server needs ``VLLM_SERVER_DEV_MODE=1``, as TRL's weight sync does)."""
    from trl.generation.vllm_client import VLLMClient

    if args.vllm_server_base_url is not None:
        client = VLLMClient(base_url=args.vllm_server_base_url, connection_timeout=args.vllm_server_timeout)
    else:
        client = VLLMClient(host=args.vllm_server_host, server_port=args.vllm_server_port,
                            connection_timeout=args.vllm_server_timeout)
    try:
        return client.get_server_info()["model_config"]["logprobs_mode"]
    finally:
        client.session.close()


def _trl_colocate_refusal() -> str | None:
    """Why TRL's own colocated vLLM cannot run here, or None. TRL 1.16 syncs it with ``model.load_weights`` on the
    engine's model, which fails on vLLM's CPU backend (its linear weights are repacked after loading; checked by
    tests/test_integration_trl_vllm.py); dppo's engine syncs with vLLM's ``reload_weights``, which works there."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return ("TRL's colocate weight sync (model.load_weights on vLLM's model) fails on vLLM's CPU backend, whose "
                "linear weights are repacked after loading, so vLLM would keep sampling from the initial weights "
                "(or fail at the first step)")
    return None


def _check(args: DPPOConfig, *, rollout_func, tools, environment_factory) -> None:
    """Refuse, before any engine starts, every setting under which μ would not be the rollout's; warn where μ is
    the rollout's but differs from what the trainer's π models (truncated sampling)."""
    m = args.dppo_method
    engine = args.dppo_rollout
    if rollout_func is not None and args.rollout_engine != "auto":
        raise ValueError(f"rollout_engine={args.rollout_engine!r} and a rollout_func: pass one of them")
    own = rollout_func is None and engine in ("hf", "vllm")  # dppo's engines sample
    if tools or environment_factory:
        if m.needs_topk:
            raise ValueError(f"method {m.name!r} with tools: TRL's tool loop regenerates after each tool call "
                             "without the rollout's top-K, so μ's top-K would not cover the regenerated tokens")
        if engine != "trl-vllm":
            raise ValueError(
                "tools / environment_factory need use_vllm=True: after each tool call TRL regenerates with "
                "_generate_single_turn, which without TRL's vLLM is transformers' generate, returning no log-probs, "
                "so the regenerated tokens would have no μ (TRL 1.16 then fails with a TypeError). dppo's own "
                "engines do not run TRL's tool loop")
    if engine == "trl-vllm" and rollout_func is None:
        if m.needs_topk:
            raise ValueError(f"method {m.name!r} needs the rollout's top-K, which TRL's vLLM path drops (it keeps "
                             "the sampled token's log-prob only): use rollout_engine='vllm' (dppo's vLLM engine, "
                             "use_vllm=False), or a rollout_func that returns " + " and ".join(TOPK_FIELDS))
    if engine == "trl-vllm":
        if args.vllm_mode == "colocate":
            why = _trl_colocate_refusal()
            if why:
                raise ValueError(f"use_vllm=True, vllm_mode='colocate': {why}. Use rollout_engine='vllm' with "
                                 "use_vllm=False: dppo's vLLM engine, also colocated, synced with vLLM's "
                                 "reload_weights")
        elif args.vllm_mode == "server":
            mode = server_logprobs_mode(args)
            if mode != "processed_logprobs":
                raise ValueError(
                    f"the vLLM server runs with logprobs_mode={mode!r}: its log-probs are not those of the "
                    "distribution it samples from (raw_* ignore the temperature and the top-k/top-p truncation), so "
                    "μ would be wrong. Restart it with `--logprobs-mode processed_logprobs` (`trl vllm-serve` "
                    "does so)")
    if own:
        _refuse_unrecordable_sampling(args)
    if (args.top_k or 0) > 0 or args.top_p < 1.0 or args.min_p is not None:
        warnings.warn("top_k/top_p/min_p truncation: μ (the rollout's log-probs) is the truncated distribution but "
                      "the trainer's π is not, so π/μ carries the kept mass (trl#6789); the paper samples without "
                      "truncation (Table 1)", stacklevel=3)


class DPPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``dppo.policy_loss(args.dppo_method, ...)`` (module docstring). Logs dppo's
    metrics as ``dppo/<name>`` (glossary in :mod:`dppo.loss`) beside TRL's."""

    _tag_names = ["trl", "grpo", "dppo"]

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs)
        config = bound.arguments.get("args")
        if not isinstance(config, DPPOConfig):
            raise TypeError(f"DPPOTrainer needs args=DPPOConfig(...), got {type(config).__name__}: GRPOConfig's "
                            "loss options mean nothing to dppo's loss")
        rollout_func = bound.arguments.get("rollout_func")
        _check(config, rollout_func=rollout_func, tools=bound.arguments.get("tools"),
               environment_factory=bound.arguments.get("environment_factory"))
        super().__init__(*args, **kwargs)
        if rollout_func is None and config.dppo_rollout == "hf":
            self.rollout_func = hf_rollout
        elif rollout_func is None and config.dppo_rollout == "vllm":
            self.rollout_func = VLLMRollout()
        if self.rollout_func is not None:
            self.rollout_func = _Tap(self.rollout_func)
            if isinstance(self.rollout_func.fn, VLLMRollout):
                self.rollout_func.fn.start(self)  # at construction: a model vLLM cannot serve fails here

    def _generate_and_score_completions(self, inputs):
        method = self.args.dppo_method
        if method.needs_topk and not isinstance(self.rollout_func, _Tap):
            raise ValueError(f"method {method.name!r} needs the rollout's top-K, which TRL's vLLM path drops: use "
                             "rollout_engine='vllm' or a rollout_func that returns " + " and ".join(TOPK_FIELDS))
        batch = super()._generate_and_score_completions(inputs)
        if method.needs_topk:
            last = self.rollout_func.last or {}
            missing = [k for k in TOPK_FIELDS if k not in last]
            if missing:
                raise ValueError(f"method {method.name!r} needs the rollout's top-K: the rollout_func returned no "
                                 f"{missing} (per completion, [T_i, K] ids and log μ)")
            ids = batch["completion_ids"]
            lengths = [len(c) for c in last["completion_ids"]]
            for key, dtype in zip(TOPK_FIELDS, (torch.long, torch.float32)):
                batch[key] = _pad_topk(key, last[key], lengths, ids.shape[1], dtype, ids.device)
        return batch

    def _ga(self) -> int:  # accumulation steps of this optimizer step (Trainer sets the attribute in train())
        if not self.model.training:
            return 1
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _dppo_denominator(self, mask: Tensor, m: Method, num_items_in_batch: Tensor) -> Tensor | float:
        """The aggregation denominator of this micro-batch's share of one optimizer step, so that the gradients TRL
        accumulates (and DDP averages) equal those of ``policy_loss`` on the whole window (``loss_is_scaled_for_ga``).
        token-mean: the window's tokens, from TRL's ``num_items_in_batch`` (as TRL's ``dapo``); sum: 1 (÷ processes,
        undoing DDP's average); the per-sequence modes: this micro-batch's denominator × accumulation steps."""
        train, ga = self.model.training, self._ga()
        procs = self.accelerator.num_processes
        if m.aggregation == "token-mean":
            den = num_items_in_batch.float().clamp(min=1.0) / procs
            return den * ga / self.args.steps_per_generation if train else den
        if m.aggregation == "sum":
            return 1.0 / procs
        return dppo.aggregation_denominator(mask, m.aggregation, m.max_len_norm) * ga

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """dppo's loss on one micro-batch of TRL's (``num_items_in_batch`` is read from ``inputs``, where TRL puts
        the window's token count)."""
        if return_outputs:
            raise ValueError("DPPOTrainer does not return outputs from compute_loss (as GRPOTrainer)")
        m = self.args.dppo_method
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tokens the model generated (1), not tool output (0)
            mask = mask * inputs["tool_mask"]
        mu = inputs.get("sampling_per_token_logps")
        if mu is None:
            raise ValueError(
                "DPPOTrainer: the batch has no sampling_per_token_logps (log μ of the sampled tokens), the anchor and "
                "IS denominator of every dppo method. TRL fills it from vLLM (use_vllm=True) or from a rollout_func "
                "that returns 'logprobs'; without either DPPOTrainer samples with dppo.integrations.trl.hf_rollout. "
                "Your rollout_func returned logprobs=None: return the sampler's log-probs (processed, at the "
                "sampling temperature). To anchor to the recomputed π_old instead, that is another method: "
                "dppo-binary-tv-recompute / minirl (their IS weight still needs μ)")
        n_tok = completion_ids.shape[1]
        topk = None
        aux_loss = None
        if m.needs_topk:  # one forward: log π, entropy and log π at the rollout's top-K ids, from the [B, T, V] logits
            topk_ids = inputs["rollout_topk_ids"]
            with self.accelerator.autocast():
                out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n_tok + 1,
                            use_cache=False, **({"output_router_logits": True} if self.aux_loss_enabled else {}))
            stats = dppo.token_stats_from_logits(out.logits[:, :-1], completion_ids, temperature=self.temperature,
                                                 gather_ids=topk_ids)
            logp, entropies = stats.logp, stats.entropy
            aux_loss = getattr(out, "aux_loss", None) if self.aux_loss_enabled else None
            topk = dppo.TopK(stats.gathered_logp, inputs["rollout_topk_logp"],
                             (topk_ids == completion_ids[..., None]).any(-1))
        else:
            logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, n_tok, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
                **{k: inputs.get(k) for k in _MM_KEYS})
        # vLLM reports NaN for tokens it could not score; TRL gives them IS ratio 1, so do we (μ := π there)
        mu = torch.where(torch.isnan(mu), logp.detach().to(mu.dtype), mu)
        old = inputs.get("old_per_token_logps")
        if m.needs_old_logp and old is None:  # TRL skips it when the policy has not moved since sampling
            old = logp.detach()
        loss, metrics = dppo.policy_loss(
            m, logp, mu, inputs["advantages"], mask, old_logp=old if m.needs_old_logp else None, topk=topk,
            denominator=self._dppo_denominator(mask, m, inputs["num_items_in_batch"]))
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / self._ga()
        self._log_dppo(metrics, entropies, mask)
        return loss

    def _log_dppo(self, metrics: dict[str, float], entropies: Tensor, mask: Tensor) -> None:
        """dppo's metrics into TRL's ``_metrics`` (averaged over the logging window by ``GRPOTrainer.log``), reduced
        over processes: max/min for the extremes, sums for counts, means otherwise."""
        mode = "train" if self.model.training else "eval"
        keys = [k for k in metrics if k != "loss"]
        ent = ((entropies.detach().float() * mask).sum() / mask.sum().clamp(min=1)).item()
        vals = torch.tensor([metrics[k] for k in keys] + [ent], device=self.accelerator.device)
        allv = self.accelerator.gather(vals[None]).view(-1, len(vals))
        for j, k in enumerate(keys + ["entropy"]):
            col = allv[:, j]
            v = col.max() if k.endswith("_max") else col.min() if k.endswith("_min") else \
                col.sum() if k == "tokens" else col.mean()
            self._metrics[mode][k if k == "entropy" else f"dppo/{k}"].append(v.item())


class _Tap:
    """The rollout function TRL calls, keeping its last output (TRL forwards extra fields to the reward functions
    only, so the top-K would not otherwise reach the batch)."""

    def __init__(self, fn):
        self.fn, self.last = fn, None

    def __call__(self, prompts, trainer):
        self.last = self.fn(prompts, trainer)
        return self.last


def _pad_topk(name: str, rows: list, lengths: list[int], width: int, dtype: torch.dtype, device) -> Tensor:
    """Per-completion [T_i, K] rows (tensors or lists) → [B, width, K], zero-padded after each completion."""
    rows = [torch.as_tensor(r, dtype=dtype) for r in rows]
    if len(rows) != len(lengths) or any(r.dim() != 2 or r.shape[0] != n for r, n in zip(rows, lengths)):
        raise ValueError(f"the rollout_func's {name} must hold one [T_i, K] entry per completion, T_i its length "
                         f"{lengths}; got shapes {[tuple(r.shape) for r in rows]}")
    out = torch.zeros((len(rows), width, rows[0].shape[-1] if rows else 0), dtype=dtype, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


# Multimodal inputs that _get_per_token_logps_and_entropies takes from the batch (the drift test checks its signature)
_MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
