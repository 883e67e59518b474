"""Sampling backends behind one protocol (rollout.base.Sampler)."""
