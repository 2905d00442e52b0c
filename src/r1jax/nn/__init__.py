"""DeepSeek's architectural ideas, one per module: pure init/apply functions over plain dicts."""
