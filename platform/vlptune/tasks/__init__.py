"""Downstream evaluation and finetuning tasks (zero-shot retrieval: retrieval.py)."""
