"""The README's "Use the loss in your own trainer" block runs as written, on a real rollout of a tiny model: its API
calls, shapes and position offsets are right, and the first mini-batch sees the pure training–inference mismatch."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

from dppo.hf.model import build_char_tokenizer, build_tiny_model, position_ids_from_mask
from dppo.engines import HFEngine
from dppo.rollout import SamplingParams, encode_prompts

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Use the loss in your own trainer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class _Batch:
    def __init__(self, ro, rewards):
        self.ro, self.rewards = ro, rewards

    def minibatches(self, k: int):
        n = self.ro.response_ids.shape[0]
        for idx in torch.randperm(n, generator=torch.Generator().manual_seed(0)).chunk(k):
            ids, mask = self.ro.input_ids[idx], self.ro.attention_mask[idx]
            yield SimpleNamespace(index=idx, input_ids=ids, attention_mask=mask,
                                  position_ids=position_ids_from_mask(mask), response_ids=self.ro.response_ids[idx],
                                  rollout_logp=self.ro.rollout_logp[idx], response_mask=self.ro.response_mask[idx])


def test_readme_trainer_example_runs_on_a_real_rollout():
    tok = build_char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=2)
    model.eval()  # no dropout: π is the function the engine sampled from
    ids, mask = encode_prompts(tok, ["12+3=", "7+45=", "1+1=", "9+9="], use_chat_template=False)
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="fp32")
    ro = engine.generate(ids, mask, SamplingParams(5, temperature=0.8), num_samples=8,
                         generator=torch.Generator().manual_seed(0))
    rewards = torch.rand(ro.response_ids.shape[0], generator=torch.Generator().manual_seed(1))
    logged = []
    before = [p.detach().clone() for p in model.parameters()]
    env = dict(rollouts=[_Batch(ro, rewards)], model=model, temperature=0.8, log=logged.append,
               optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    exec(compile(_example(), str(README), "exec"), env)

    assert len(logged) == 4  # one metrics dict per mini-batch
    # mini-batch 1 runs before any update with the engine's own weights (fp32): π = μ up to kernel rounding, so the
    # README's offsets h[:, -T-1:-1] and position ids line up with what the engine sampled
    first = next(_Batch(ro, rewards).minibatches(4))
    assert not first.attention_mask.all()  # it holds left-padded prompts too
    assert logged[0]["abs_diff_max"] < 1e-5, logged[0]
    assert logged[-1]["abs_diff_mean"] > 1e-4  # the later ones see the updated policy
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
