"""Model search: the space, Optuna studies and samplers, trials, reports, the runner."""
