"""lmcoh: fine-tune small causal language models as goal-conditioned policies on text-encoded
decision problems, and measure how coherent they are. See README.md and docs/theory.md."""

__version__ = "0.2.0"
