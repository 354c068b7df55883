"""What odeify's training recipes share; each recipe (``recipes/*.py``) is policy on top of it.

One module per idea:

- :mod:`~odeify.train.config`: dataclass configs from YAML and ``--set``, the recipe entry point;
- :mod:`~odeify.train.checkpoints`: atomic checkpoints that resume exactly;
- :mod:`~odeify.train.metrics`: the ``metrics.jsonl`` of a run, trimmed on resume;
- :mod:`~odeify.train.optim`: AdamW groups, warmup + cosine, seeds;
- :mod:`~odeify.train.data`: corpora, the token cache, deterministic batches;
- :mod:`~odeify.train.sampler`: the solver step counts of each training step;
- :mod:`~odeify.train.evaluate`: next-token loss over windows at several step counts;
- :mod:`~odeify.train.distill`: depth-adaptation losses, teacher targets, layer dropping;
- :mod:`~odeify.train.cost`: the FLOP model and budgets;
- :mod:`~odeify.train.precision`: which dtype autocast trains in on a device;
- :mod:`~odeify.train.plots`: perplexity plots;
- :mod:`~odeify.train.distributed`: torchrun process groups, DDP / FSDP2, full state views.

Nothing is imported here, so ``import odeify.train.data`` stays light.
"""
