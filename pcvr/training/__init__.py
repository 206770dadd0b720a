"""Training: the loop (``trainer``), its resumable state (``state``), optimisers and
schedules (``optim``), the loss (``losses``), the EMA (``ema``) and the scalars it reports
(``reporting``)."""
