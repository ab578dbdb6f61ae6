"""qwen2-convert: HF safetensors <-> Orbax checkpoints, streamed in memory bounded by one tensor."""
