"""Stage 1, data: task files (text jsonl, image npz / class folders), the generated demo
suite, the unlabeled pools surgery learns from, and the epoch sampler."""
