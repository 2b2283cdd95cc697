"""Scoring, losses, task evaluation and perplexity."""
