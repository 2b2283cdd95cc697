"""The fine-tuning loop shared by every method, its configuration, checkpoints and plots."""
