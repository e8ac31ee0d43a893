"""Hyperparameter search: search-space files, the Optuna searcher, the Tune runner, results and TensorBoard.

* :mod:`vlptune.search.space`: ``load_space(file)`` -> :class:`SearchSpace` (validated).
* :mod:`vlptune.search.params`: the schema of a search-space file and its parameters (:class:`Param`).
* :mod:`vlptune.search.plan_file`: what search-space and study files share: the resolved base recipe, ``-o`` override splitting, ``describe()`` headers.
* :mod:`vlptune.search.when`: the ``when:`` condition language of parameters (parse, check, evaluate).
* :mod:`vlptune.search.optuna_searcher`: :class:`OptunaSearcher`, a Ray Tune searcher over an Optuna study.
* :mod:`vlptune.search.layout`: an experiment directory's files (read and written), finding experiments.
* :mod:`vlptune.search.runner`: ``run_search(file, ...)``: a Tune experiment of Ray Train trials.
* :mod:`vlptune.search.trainable`: the Tune trainable and the Ray Train worker adapter of a trial.
* :mod:`vlptune.search.preflight`: the data and storage made ready and checked before trials start.
* :mod:`vlptune.search.results`: ``collect(exp_dir)``, tables, CSV/JSON, the best recipe.
* :mod:`vlptune.search.board`: TensorBoard over an experiment on 127.0.0.1.
* :mod:`vlptune.search.cli`: ``space check``, ``search``, ``results``, ``board``.

Nothing here imports Ray at module import time except the optuna searcher and retention
(imported by the runner when an experiment runs); the Ray cluster session is :mod:`vlptune.cluster.session`.
"""
