"""Hyperparameter search: search-space files, the Optuna searcher, the Tune runner, results and TensorBoard.

* :mod:`vlptune.search.space`: ``load_space(file)`` -> :class:`SearchSpace` (validated).
* :mod:`vlptune.search.optuna_searcher`: :class:`OptunaSearcher`, a Ray Tune searcher over an Optuna study.
* :mod:`vlptune.search.runner`: ``run_search(file, ...)``: a Tune experiment of Ray Train trials.
* :mod:`vlptune.search.results`: ``collect(exp_dir)``, tables, CSV/JSON, the best recipe.
* :mod:`vlptune.search.board`: TensorBoard over an experiment on 127.0.0.1.
* :mod:`vlptune.search.cli`: ``space check``, ``search``, ``results``, ``board``.

Nothing here imports Ray at module import time except the runner's callers.
"""
