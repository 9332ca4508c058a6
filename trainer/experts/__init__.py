"""Stage 2, experts: where each task's fine-tuned model comes from (files in their library's
format, read by ``formats/``; the cache; or the fine-tuning loop here), the content-addressed
cache, pre-training of the base, zero-shot heads, and the jointly trained multitask
reference."""
