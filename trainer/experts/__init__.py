"""Stage 2, experts: where each task's fine-tuned model comes from (a checkpoint, the cache,
or the fine-tuning loop here), the content-addressed cache, pre-training of the base, and the
jointly trained multitask reference."""
