"""Operating characteristics of adaptive seeds (study/sequential.py), by simulation: no training, the statistics
and the allocation alone. Prints, for a factor with no effect and one with an effect of min_effect, how often the
group-sequential procedure, the naive repeated look and the fixed max-seed design decide, and the cells each
spends.

    python -m ript_ablate.bench.adaptive_seeds --sd 8 --pairs-per-seed 4 --configs 8 --reps 20000
"""

from __future__ import annotations

import argparse

from ript_ablate.study.sequential import SeedPlan, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initial", type=int, default=3)
    parser.add_argument("--max", type=int, default=10)
    parser.add_argument("--min-effect", type=float, default=5.0, help="points of the objective")
    parser.add_argument("--sd", type=float, default=8.0, help="SD of one paired difference, in points")
    parser.add_argument("--pairs-per-seed", type=int, default=4, help="pairs a seed adds (2x2x2 grid: 4)")
    parser.add_argument("--configs", type=int, default=8, help="configurations that run each added seed")
    parser.add_argument("--reps", type=int, default=20000)
    args = parser.parse_args(argv)
    plan = SeedPlan(args.initial, args.max, args.min_effect)
    print(f"seeds {plan.initial}..{plan.max}, min_effect {plan.min_effect:g} points, paired SD {args.sd:g}, "
          f"{args.pairs_per_seed} pairs per seed, {args.configs} configurations, {args.reps} simulated studies each")
    print("| true effect | procedure | decided an effect | right sign | no effect >= min | undecided | mean seeds "
          "| mean cells |")
    print("|---|---|---|---|---|---|---|---|")
    for effect in (0.0, plan.min_effect):
        for rule in ("sequential", "naive", "fixed"):
            op = simulate(effect, plan, args.sd, args.pairs_per_seed, args.reps, seed=1, rule=rule)
            print(f"| {effect:g} | {rule} | {op.decided_effect:.3f} | {op.decided_right:.3f} | {op.decided_none:.3f} "
                  f"| {op.undecided:.3f} | {op.mean_seeds:.2f} | {op.mean_seeds * args.configs:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
