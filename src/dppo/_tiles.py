"""Tile kernels and input checks shared by :mod:`dppo.token_stats` and :mod:`dppo.fused`.

Both walk over token tiles of ``chunk_size`` rows, each a [chunk, V] block of temperature-scaled logits in the
accumulation dtype (fp32; fp64 for fp64 inputs), built by one GEMM in the input dtype into buffers allocated once
per call (:class:`_Workspace`), and reduce each tile to O(chunk) statistics (:func:`_tile_stats`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Size of one logits tile (fp32 bytes). Sweep on the 2-core CPU of docs/benchmarks.md (H = 1536, V = 151,936,
# N = 1024 bf16, fwd+bwd, best of 3 on a shared machine, ±5 %): 32 MB 1.82 s, 128 MB 1.78 s, 256 MB 1.93 s,
# 512 MB 2.07 s. Small tiles make every tile's GEMM stream all of W for few tokens (memory-bound below ~100 tokens
# in bf16); big ones cost page faults and cache misses. 128 MB = 220 tokens at V = 151,936.
DEFAULT_TILE_BYTES = 128 * 2**20
# On a CUDA GPU the GEMMs are fast and the per-tile elementwise passes and launches dominate, so tiles are larger.
# Measured on an H200 (benchmarks/token_stats_cuda.py, H = 1536, V = 151,936): the fused Top-K DPPO loss took
# 293.6 ms with 128 MB tiles and 102.3 ms with 1 GB tiles at bf16 N = 16,384 (801 → 517 ms in fp32), for ~2 GB more
# peak memory (still ~1 % of the naive path's [N, V] tensors at that N). 1 GB = 1,767 tokens at V = 151,936.
DEFAULT_TILE_BYTES_CUDA = 2**30


def default_chunk_size(vocab_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                       ) -> int:
    """Tokens per forward tile so that one tile of accumulation-dtype logits is ~DEFAULT_TILE_BYTES (CPU) or
    ~DEFAULT_TILE_BYTES_CUDA (a CUDA device)."""
    elem = 8 if dtype == torch.float64 else 4
    cuda = device is not None and torch.device(device).type == "cuda"
    return max(1, (DEFAULT_TILE_BYTES_CUDA if cuda else DEFAULT_TILE_BYTES) // (elem * max(1, vocab_size)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 (gradcheck); everything else (fp32, bf16, fp16) accumulates the log-sum-exp in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_out(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """out = x·wᵀ (+ b), written into a preallocated buffer (a fresh [c, V] tensor per tile costs page faults)."""
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


class _Workspace:
    """Tile buffers allocated once per call and reused by every tile.

    Freshly allocated multi-MB tensors are returned to the OS on free and page-faulted in again on next use; on the
    measured CPU that made an out-of-place ``exp`` over a tile 3.5× slower than into a warm buffer.
    """

    def __init__(self, numel: int, acc: torch.dtype, low: torch.dtype, device: torch.device, extra: int):
        self.acc = torch.empty(numel, dtype=acc, device=device)
        self.low = torch.empty(numel, dtype=low, device=device) if low != acc else None
        self.extra = torch.empty(numel, dtype=acc, device=device) if extra else None
        # CPU bf16/fp16: a transposed copy of dz for the dh GEMM (see grad_input)
        self.low_t = torch.empty(numel, dtype=low, device=device) if low != acc and device.type == "cpu" else None

    def logits(self, x: Tensor, w: Tensor, b: Tensor | None, temperature: float) -> Tensor:
        """Temperature-scaled logits of one tile in the accumulation dtype (GEMM in the input dtype, then upcast)."""
        shape = (x.shape[0], w.shape[0])
        z = self.acc[: shape[0] * shape[1]].view(shape)
        if self.low is None:
            _linear_out(x, w, b, z)
        else:
            z.copy_(_linear_out(x, w, b, self.low[: z.numel()].view(shape)))
        if temperature != 1.0:
            z.div_(temperature)  # the forward and the backward recompute use the same op: p matches lse bit for bit
        return z

    def scratch(self, like: Tensor) -> Tensor:
        return self.extra[: like.numel()].view(like.shape)  # type: ignore[index]

    def to_low(self, dz: Tensor) -> Tensor:
        """dz cast to the GEMM dtype (into the buffer the tile's low-precision logits used)."""
        return dz if self.low is None else self.low[: dz.numel()].view(dz.shape).copy_(dz)

    def grad_input(self, dz: Tensor, w: Tensor, out: Tensor) -> Tensor:
        """out = dz · w, [c, V']·[V', H] → [c, H]: the hidden-state gradient of a tile (dz in the GEMM dtype).

        torch's CPU GEMM for bf16/fp16 on CPUs without a native bf16 matmul (its fallback kernel) is ~70× slower
        when the left factor is row-major than when it is a transposed view: [32, 151936]·[151936, 1536] took 40.6 s
        against 0.6 s single-threaded (AMD EPYC, AVX2, torch 2.13). So on CPU the low-precision dz is first copied
        into a [V', c] buffer (a few % of the GEMM's time) and multiplied as its transpose. The dW GEMM (dzᵀ·h)
        already has the fast layout (its left factor is a transposed view).
        """
        if self.low_t is None or dz.dtype == self.acc.dtype:
            return torch.mm(dz, w, out=out)
        t = self.low_t[: dz.numel()].view(dz.shape[1], dz.shape[0]).copy_(dz.t())
        return torch.mm(t.t(), w, out=out)

    def grad_weight(self, dz: Tensor, x: Tensor, out: Tensor, accumulate: bool) -> Tensor:
        """out = dzᵀ·x (or out += dzᵀ·x), [c, V']ᵀ·[c, H] → [V', H]: the weight gradient of a tile.

        torch's CPU bf16/fp16 GEMM (the same fallback kernel) builds its output in an fp32 temporary of the whole
        output's size: +892 MB for one [151936, 1536] bf16 ``addmm_`` (measured). On CPU the rows are therefore done
        in slices of at most one tile's element count, so that temporary stays within a tile.
        """
        rows = out.shape[0]
        step = rows if self.low_t is None or dz.dtype == self.acc.dtype else max(1, self.acc.numel() // out.shape[1])
        for r0 in range(0, rows, step):
            a = dz[:, r0 : r0 + step].t()
            if accumulate:
                out[r0 : r0 + step].addmm_(a, x)
            else:
                torch.mm(a, x, out=out[r0 : r0 + step])
        return out


def _tile_stats(
    y: Tensor,
    e_buf: Tensor,
    tgt: Tensor,
    gids: Tensor | None,
    topk: int,
    want_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor]:
    """Statistics of one [c, V] tile of temperature-scaled logits, given in ``y`` (accumulation dtype, overwritten).

    Works relative to the row max m: y ← z − m, s = Σ exp y, lse = m + log s, and every log-prob is y[v] − log s.
    Shifting first keeps the entropy H = log s − Σ exp(y)·y / s free of the cancellation that lse − Σ p·z suffers
    when |z| is large. ``e_buf`` is a [c, V] scratch buffer that ends up holding e = exp(z − m), so that
    p = e / s is at hand for a caller that needs the softmax itself (:mod:`dppo.fused`). Returns (lse, logp,
    entropy, topk_ids, topk_logp, gathered, e, s), each [c], [c, K] or (e) [c, V].
    """
    m = y.amax(dim=-1, keepdim=True)
    y.sub_(m)
    e = torch.exp(y, out=e_buf)
    s = e.sum(dim=-1)
    log_s = s.log()
    lse = m.squeeze(-1) + log_s
    logp = y.gather(-1, tgt[:, None]).squeeze(-1) - log_s
    topk_ids = topk_logp = None
    if topk:
        vals, topk_ids = y.topk(topk, dim=-1)
        topk_logp = vals - log_s[:, None]
    gathered = y.gather(-1, gids) - log_s[:, None] if gids is not None else None
    # Σ exp(y)·y in place in y (read last): one pass fewer than vecdot's temporary, and e stays intact.
    ent = log_s - y.mul_(e).sum(dim=-1) / s if want_entropy else None
    return lse, logp, ent, topk_ids, topk_logp, gathered, e, s


def _check_ids(name: str, ids: object, shape: tuple[int, ...], v: int, device: torch.device) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected {shape}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the hidden states/logits are on {device}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= v:
            raise ValueError(f"{name} holds ids outside [0, {v}) (vocabulary size {v}): min {lo}, max {hi}")
    return ids.long()


def _check_common(temperature: object, topk: object, chunk_size: object, v: int) -> tuple[float, int]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if topk < 0 or topk > v:
        raise ValueError(f"topk must be in [0, V={v}] (the vocabulary size), got {topk}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return float(temperature), topk


def _float(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_head(hidden: object, weight: object, bias: object) -> tuple[Tensor, Tensor, Tensor | None]:
    """hidden [..., H], weight [V, H] and bias [V] or None: floating, same dtype and device, matching H and V."""
    hidden = _float("hidden", hidden)
    weight = _float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has hidden size H={hidden.shape[-1] if hidden.dim() else None} (shape {tuple(hidden.shape)}) "
            f"but weight is [V, H] = {tuple(weight.shape)}: the last dims must match"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one so the dtypes match")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        v = weight.shape[0]
        bias = _float("bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape ({v},) to match weight, got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias must have weight's dtype/device ({weight.dtype}, {weight.device})")
    return hidden, weight, bias


def _flat_ids(target_ids, gather_ids, lead: tuple, v: int, device) -> tuple[Tensor, Tensor | None]:
    """Validated ids flattened over the leading dims: target [N], gather [N, K'] or None."""
    tgt = _check_ids("target_ids", target_ids, lead, v, device).reshape(-1)
    if gather_ids is None:
        return tgt, None
    if not isinstance(gather_ids, Tensor) or gather_ids.dim() != len(lead) + 1:
        shape = tuple(gather_ids.shape) if isinstance(gather_ids, Tensor) else type(gather_ids).__name__
        raise ValueError(f"gather_ids must have shape {lead} + (K',), got {shape}")
    gids = _check_ids("gather_ids", gather_ids, lead + (gather_ids.shape[-1],), v, device)
    return tgt, gids.reshape(-1, gids.shape[-1])
