"""qwen2-train: training for qwen2-jax. `train.loss` is the HF-exact objective; `train.cli` the command
(config parsing in `train.config`, model and shardings in `train.model_setup`, the loop in `train.loop`)."""
