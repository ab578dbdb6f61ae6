"""qwen2-jax: Qwen2 and Qwen2-MoE in JAX/Flax, numerically equal to HF transformers."""

from qwen2_jax.checkpoint import load_checkpoint
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.forward import forward, forward_outputs
from qwen2_jax.generate import GenerateOptions, Generator, generate, generate_outputs, generate_stream
from qwen2_jax.options import RunOptions
from qwen2_jax.safetensors_io import CheckpointError

__all__ = [
    "Qwen2Config",
    "ConfigError",
    "CheckpointError",
    "RunOptions",
    "load_checkpoint",
    "forward",
    "forward_outputs",
    "Generator",
    "GenerateOptions",
    "generate",
    "generate_outputs",
    "generate_stream",
]
