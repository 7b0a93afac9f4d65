"""Rewards: rule-based components, the reward-model scorer, and the score stage."""
