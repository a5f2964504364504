"""ript-ablate: ablation studies of RIPT-style reinforcement post-training of robot policies."""

__version__ = "0.1.0"
