"""On-disk formats: deltatune's own delta directory, PEFT LoRA adapters, sharded checkpoints."""
