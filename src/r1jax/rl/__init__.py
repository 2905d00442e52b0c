"""The R1 recipe: verifiable tasks, rewards, GRPO and the multi-stage pipeline."""
