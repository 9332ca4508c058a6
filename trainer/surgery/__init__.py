"""Stage 4, surgery: the multi-task model (merged backbone + per-task adapters and heads),
the experts' representations it is aligned to, and the label-free surgery loop."""
