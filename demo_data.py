"""Demo data with planted signals: ``python3 demo_data.py --out DIR [options]`` (see ``--help``).

The generator lives in ``pcvr/demo/``; this file is its command line, kept where users of the
project expect it.
"""
from pcvr.demo.generator import main
from pcvr.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
