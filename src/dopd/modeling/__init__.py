"""Models: loading Hugging Face models and tokenizers (``loading``), the token-aligned views of one
completion under different prompts and their logits or head inputs (``alignment``), and the tiny
models and character tokenizers the tests and the lab build from config (``tiny``).
"""
