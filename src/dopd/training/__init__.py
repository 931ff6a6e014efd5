"""The training loop on accelerate: on-policy sampling (``rollout``), one exact optimizer step
(``step``), the trainer (``trainer``), checkpoints (``checkpoint``), cross-rank sums
(``distributed``), non-finite step diagnosis (``faults``) and greedy evaluation (``evaluation``).
"""
