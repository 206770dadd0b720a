"""Build the platform submission: ``python3 package.py --ckpt DIR --out FILE [--data DIR]``.

Writes one zip with ``code/`` (infer.py and the modules it imports, at most 100 MB) and
``model/<checkpoint>/``, then dry-runs ``infer.main()`` from the unpacked zip in a clean
temporary folder; the zip is kept only if that run writes a valid predictions.json
(``pcvr/packaging.py``). Upload ``code/`` as the inference scripts and publish the checkpoint.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from pcvr.config import RunConfig, build_parser, section_from_namespace
from pcvr.errors import run_cli
from pcvr.packaging import PackageOptions, package
from pcvr.runtime import create_logger

log = logging.getLogger("package")


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser([PackageOptions, RunConfig], __doc__.splitlines()[0])
    opts = section_from_namespace(PackageOptions, parser.parse_args(argv))
    create_logger()
    code_bytes, ckpt_bytes, rows = package(opts)
    print(f"wrote {opts.out}: code {code_bytes / 1e6:.2f} MB (limit 100 MB), checkpoint "
          f"{ckpt_bytes / 1e6:.1f} MB; dry run of infer.main() from the unpacked bundle: "
          f"{rows} predictions", flush=True)


if __name__ == "__main__":
    run_cli(main)
