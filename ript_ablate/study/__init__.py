"""Studies: a spec (grid or Optuna search, seeds as an axis) expanded into cells, each one training run,
run exactly once by workers over Optuna's storages, tracked as MLflow parent and child runs."""
