"""Files in and out: examples, privileged prompts and tokenization (``data``); crash-safe writes
(``atomic``).
"""
