"""Debiasing benchmarks of endogenous decoupling: data (Coat, MovieLens 100K, a simulator with
known relevance and popularity-biased exposure), the compared models, their training loops,
ranking metrics and report tables. ``benchmarks/debias.py`` and ``benchmarks/movielens.py``
are thin command lines over this package."""
