"""Experiments on the toy world, run from the repository root: `python -m experiments.reasoning`,
`python -m experiments.ablations`; published results live in experiments/results/."""
