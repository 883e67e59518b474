"""Advantages, losses and the update step shared by GRPO, DASH, PPO and SFT."""
