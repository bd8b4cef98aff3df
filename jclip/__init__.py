"""jclip: a JAX/Flax NNX stack for pretraining CLIP-family two-tower models."""

__version__ = "0.1.0"
