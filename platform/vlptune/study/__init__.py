"""Studies built on search experiments: ablations (variants x seeds with statistics),
promotion of light trials to full runs, hyperparameter importance."""
