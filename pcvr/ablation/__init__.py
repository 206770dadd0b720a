"""Ablation tables a user can trust: a base configuration x variant flag sets x seeds.

Every cell of the table is one ``train.py`` run (the base flags, then the variant's, then
``--seed S``) followed by one ``infer.py --score`` on the held-out split, each in its own
process, so that a cell runs exactly what a user would run and a failing variant cannot take
the table down with it. A finished cell is cached (``<work_dir>/cells/<cell>/result.json``,
keyed by the flags, the seed and the data's fingerprint), so an interrupted table continues
where it stopped; a failed cell is never cached and runs again next time.

Per variant the table gives the held-out AUC mean ± std over the seeds, the paired delta
against the base (``variant - base`` per seed, mean ± the 95 % Student-t half-width over the
seeds both finished) and whether that interval excludes 0 ("beyond noise"), the oracle AUC
and lift when the data has a truth sidecar (``pcvr.demo.oracle``), the effect capture on
demo data, and the wall time per cell. Outputs: ``<prefix>.md``, ``<prefix>.csv`` and, when
matplotlib is installed, ``<prefix>.png`` (the deltas with their intervals).

Layers, from the bottom: ``variants`` (the table's rows) and ``stats`` (the seed statistics);
``data`` (fingerprints, the demo data); ``cells`` (one variant and seed: plan, cache key,
cache, run); ``report`` (the rows, markdown, CSV and figures); ``runner`` (a table or a
learning curve, and ``main``, the command line of ``benchmarks/ablate.py``). A module
imports only from layers below it.
"""
