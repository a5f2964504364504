"""The RIPT algorithm, one concern per module: distributions (log-probs), rollouts (contexts x K, dynamic
sampling), advantages (RLOO), update (clipped loss, accumulation, parameter groups), trainer (the iteration)."""
