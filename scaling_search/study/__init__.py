"""The Optuna study as the search's record: storage, trials, queue and claims, liveness, stages."""
