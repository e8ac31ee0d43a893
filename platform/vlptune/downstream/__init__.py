"""Downstream tasks finetuned on a pretrained checkpoint (VQA, NLVR2, SNLI-VE, retrieval, captioning), registered by name.

* :mod:`vlptune.downstream.base`: the task plug-in, its head, the record tasks' shared shape;
* :mod:`vlptune.downstream.registry`: implementations by name, built-ins loaded on first lookup;
* one module per task family: :mod:`~vlptune.downstream.vqa`, :mod:`~vlptune.downstream.classify`
  (NLVR2, SNLI-VE), :mod:`~vlptune.downstream.retrieval`, :mod:`~vlptune.downstream.captioning`.

Their torch-free configs live in :mod:`vlptune.config.downstream`; the finetune
mode of the training loop in :mod:`vlptune.train.finetune`.
"""
