"""Ablation tables: a base configuration x variant flag sets x seeds (issue 17).

    python3 benchmarks/ablate.py --quick                 # small demo data, 2 seeds, 3 variants
    python3 benchmarks/ablate.py                         # the default table (50,000 demo rows)
    python3 benchmarks/ablate.py --data_dir DIR --variants my_variants.txt --seeds 5
    python3 benchmarks/ablate.py --add "+lr3e-4=--lr 3e-4" --only +lr3e-4

Each cell runs train.py (base flags, the variant's flags, --seed S) and infer.py --score on
the held-out split in their own processes; finished cells are cached under --work_dir, so an
interrupted table continues where it stopped. The table (AUC mean ± std, the paired delta vs
the base with its 95 % interval, oracle AUC and lift, effect capture, minutes per cell) goes
to <prefix>.md / .csv / .png. The logic lives in pcvr/ablation/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pcvr.ablation.runner import main  # noqa: E402
from pcvr.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
