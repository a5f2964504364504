"""RLOO advantages: each rollout's reward minus the mean reward of the other rollouts (leave-one-out).

    A_k = R_k - (sum_j R_j - R_k) / (K - 1)

One scalar per trajectory, applied to each of its action steps; no std normalisation, no discount.
"""

from __future__ import annotations

import numpy as np


def rloo(rewards: np.ndarray) -> np.ndarray:
    """Per group: rewards (G, K) -> advantages (G, K). Requires K >= 2."""
    rewards = np.asarray(rewards, dtype=np.float64)
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 rollouts per group")
    baseline = (rewards.sum(-1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline


def rloo_over_all(rewards: np.ndarray) -> np.ndarray:
    """`rloo_over_all_rollouts`: the baseline pool is every rollout of the iteration (divide by N - 1)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return rloo(rewards.reshape(1, -1)).reshape(rewards.shape)


def advantages(rewards: np.ndarray, over_all_rollouts: bool) -> np.ndarray:
    return rloo_over_all(rewards) if over_all_rollouts else rloo(rewards)
