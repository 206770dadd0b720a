"""PCVR HyFormer: a training framework for post-click conversion prediction.

Layers, from the bottom: ``config`` (every flag), ``errors``, ``schema`` (the feature layout),
``batch`` (the typed batch); ``data`` (parquet -> batches), ``model`` (the HyFormer); then
``evaluation``, ``checkpoint`` and ``training`` (the loop), ``distributed`` (several
processes) and ``packaging`` (the submission). ``demo`` generates data with planted signals
and ``debias`` holds the debiasing benchmarks. A module imports only from layers below it.
"""
