"""qwen2-jax: Qwen2 and Qwen2-MoE in JAX/Flax, numerically equal to HF transformers."""

from qwen2_jax.checkpoint import load_checkpoint
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.forward import forward
from qwen2_jax.generate import generate, generate_stream
from qwen2_jax.safetensors_io import CheckpointError

__all__ = ["Qwen2Config", "ConfigError", "CheckpointError", "load_checkpoint", "forward", "generate", "generate_stream"]
