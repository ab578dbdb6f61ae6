"""Training pieces for qwen2-jax. `train.loss`: the causal-LM objective, HF-exact, MoE aux loss included."""
