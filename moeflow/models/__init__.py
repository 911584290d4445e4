"""Models: Hugging Face config.json + safetensors -> ModelSpec and weights; family adapters;
tiny local checkpoints. `spec` and `families` are pure; `weights` and `checkpoint` use torch."""
