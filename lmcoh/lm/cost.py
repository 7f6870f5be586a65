"""What training will cost, before it runs: tokens, FLOPs and seconds on this machine.

A LoRA step of a causal LM costs about 4 x parameters FLOPs per token it runs: 2 for the forward
pass and 2 for the backward pass through the frozen weights (their own gradients are never
formed; the adapter's are small, and so are the embeddings' when conditioning trains them, since
the logits are taken at the loss positions only). Tabulating the policy, a forward pass, costs 2 x parameters
per token. The seconds follow from this machine's measured GEMM rate, in the precision training
will use, times the share of it training reaches (`EFFICIENCY`, measured by
``python -m lmcoh.bench --train``), plus a fixed cost per step and a cost per token beyond the
FLOPs (building the prefix trees, the attention mask, the framework), which dominate for tiny
models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Measured on this project's 2-core CPU (python -m lmcoh.bench --train): a LoRA step of a 135M
# model runs at about half the GEMM rate; a step of any model costs some 20 ms beyond its FLOPs
# (the optimiser, callbacks, the data loader), and a tabulation some 50 ms.
EFFICIENCY = 0.5
STEP_OVERHEAD_S = 0.02
CHECK_OVERHEAD_S = 0.05
# Beyond the FLOPs, per token: measured 0.9 s for a step of 3100 tokens of a 0.6M-parameter GPT-2
# stand-in, whose FLOPs take a millisecond (the held-out valley walk, one thread).
TOKEN_OVERHEAD_S = 2.5e-4
# A step's budget when lmcoh sizes the batch: the FLOPs of 1024 tokens of a 135M model (seconds
# on a CPU), and activations of at most 1.5 GB at about 80 bytes per token, layer and hidden unit
# (float32 LoRA training keeps some twenty vectors of the layer's width per token for backward).
STEP_FLOPS = 4 * 135e6 * 1024
STEP_MEMORY = 1.5e9
ACTIVATION_BYTES = 80


def native_bf16() -> bool:
    """True on a CPU with bfloat16 arithmetic in hardware (AVX512-BF16 or AMX), where autocast to
    bfloat16 speeds training up; elsewhere a bfloat16 product runs emulated, far slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def gemm_rate(dtype: torch.dtype = torch.float32, device: str = "cpu",
              shape: tuple[int, int, int] = (1024, 576, 1536), seconds: float = 0.3) -> float:
    """GFLOP/s of torch matrix products of ``shape`` (m, k, n) in ``dtype`` on ``device``: the best
    of repeated products over about ``seconds`` (the best, since other work on a shared machine
    only ever slows a product down)."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(device, dtype), torch.randn(k, n).to(device, dtype)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * m * k * n / best / 1e9


@dataclass(frozen=True)
class ModelShape:
    """What the cost of training a model depends on."""

    parameters: int
    hidden_size: int
    layers: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        text = model.config.get_text_config()
        return cls(model.num_parameters(), text.hidden_size, text.num_hidden_layers)

    def step_tokens(self) -> float:
        """The most tokens a step should run: `STEP_FLOPS` and `STEP_MEMORY` of activations."""
        return min(STEP_FLOPS / (4 * self.parameters),
                   STEP_MEMORY / (ACTIVATION_BYTES * self.hidden_size * self.layers))


@dataclass(frozen=True)
class TrainingCost:
    """The work of a training run: ``steps`` of ``tokens_per_step`` tokens through a model of
    ``parameters``, and ``checks`` tabulations of ``check_tokens`` tokens each."""

    parameters: int
    tokens_per_step: float
    steps: int
    check_tokens: float = 0.0
    checks: int = 0

    @property
    def tokens(self) -> float:
        return self.tokens_per_step * self.steps

    @property
    def flops(self) -> float:
        return self.parameters * (4 * self.tokens + 2 * self.check_tokens * self.checks)

    def step_seconds(self, rate_gflops: float) -> float:
        return 4 * self.parameters * self.tokens_per_step / (EFFICIENCY * rate_gflops * 1e9) + STEP_OVERHEAD_S

    def check_seconds(self, rate_gflops: float) -> float:
        return 2 * self.parameters * self.check_tokens / (EFFICIENCY * rate_gflops * 1e9) + CHECK_OVERHEAD_S

    def seconds(self, rate_gflops: float) -> float:
        """Expected wall time at a measured GEMM rate of ``rate_gflops``, with `TOKEN_OVERHEAD_S` (left
        out of `step_seconds` and `check_seconds`, whose ratio sets how often the oracle checks)."""
        overhead = TOKEN_OVERHEAD_S * (self.tokens + self.check_tokens * self.checks / 2)
        return self.steps * self.step_seconds(rate_gflops) + self.checks * self.check_seconds(rate_gflops) + overhead


def training_rate(bf16: bool) -> float:
    """This machine's GEMM rate (GFLOP/s) in the precision a run trains in, on the device it trains on."""
    return gemm_rate(torch.bfloat16 if bf16 else torch.float32, "cuda" if torch.cuda.is_available() else "cpu")


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
