"""The health line: how the sampled behaviour does next to the evaluated (deterministic) policy, per task, and how
many groups carried no RLOO signal. When exploration and evaluation drift apart (a tiny behaviour-cloned scale that
a large `scale_factor` blows up, a temperature too high), the sampled success falls far below the evaluated one and
most groups are all-fail or all-success: RIPT then learns from little. Printed at every evaluation of a run and
tabled in every report."""

from __future__ import annotations

from typing import Any

SAMPLED = "train/success_rate/"
EVALUATED = "eval/success_rate/"
EQUAL_REWARD = "sampling/equal_reward_fraction"


def task_pairs(metrics: dict[str, Any], tasks: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """{task: (sampled success, evaluated success)} for the tasks (default: every evaluated one) with both."""
    tasks = tasks if tasks is not None else [k[len(EVALUATED):] for k in metrics if k.startswith(EVALUATED)]
    return {t: (float(metrics[SAMPLED + t]), float(metrics[EVALUATED + t])) for t in tasks
            if SAMPLED + t in metrics and EVALUATED + t in metrics}


def health_line(metrics: dict[str, Any], tasks: list[str] | None = None) -> str | None:
    """'health: reach-v3 sampled 12% / evaluated 60% | ... | equal-reward groups 75%', or None before any
    rollout."""
    pairs = task_pairs(metrics, tasks)
    if not pairs:
        return None
    parts = [f"{t} sampled {100 * s:.0f}% / evaluated {100 * e:.0f}%" for t, (s, e) in pairs.items()]
    if EQUAL_REWARD in metrics:
        parts.append(f"equal-reward groups {100 * float(metrics[EQUAL_REWARD]):.0f}%")
    return "health: " + " | ".join(parts)
