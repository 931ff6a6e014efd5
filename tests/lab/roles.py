"""The token classes the built-in lab tasks may assign (docs/lab.md): every role a task's
``token_roles`` returns must be one of these."""

LAB_TOKEN_ROLES = frozenset(
    {"format", "learnable_info", "unavailable_info", "order_forced", "capability", "skill"}
)
