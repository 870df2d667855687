"""Weight files as users have them: single-file layouts, LoRA files, hashing, streamed writing."""
