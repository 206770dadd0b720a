"""Prints the flag reference of README.md from config.py (the flags' one declaration).

    python3 scripts/flags_md.py > /tmp/flags.md
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pcvr.config as config  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for cls in config.SECTIONS + (config.InferConfig,):
        print(f"#### {cls.__name__}: {(cls.__doc__ or '').strip()}\n")
        print("| flag | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default
            if f.name == "ns_groups_json":
                default = "<project dir>/ns_groups.json"
            name = f"`--{f.name}`"
            if config._field_type(cls, f) is bool:
                neg = f.metadata.get("negate") or "no_" + (
                    f.name[4:] if f.name.startswith("use_") else f.name)
                name += f" / `--{neg}`"
            extra = f" Choices: {', '.join(map(str, f.metadata['choices']))}." \
                if "choices" in f.metadata else ""
            env = f" Env `{f.metadata['env']}`." if "env" in f.metadata else ""
            print(f"| {name} | `{default!r}` | {f.metadata['help']}.{extra}{env} |")
        print()


if __name__ == "__main__":
    main()
