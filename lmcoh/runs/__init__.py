"""Runs: what the recipes (recipes/*.py) are made of. Their arguments (`arguments`), their output
directory (`directory`), a self-training run (`selftrain`) and the pieces of the
temperature-versus-retraining comparison (`temperature`). The package never imports a recipe."""
