"""Run the whole workbook headless: execute every notebook in order and save the results.

    python -m helpers.runs.run_all                  # profile from $SAE_PROFILE (default cpu / gpu)
    SAE_PROFILE=test python -m helpers.runs.run_all

Executed notebooks (with their outputs and figures) are written to cache/runs/<profile>/.
A notebook that fails stops the run with its error; the ones before it are kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from helpers.settings.paths import NOTEBOOKS_DIR
from helpers.settings.profiles import ENV_VAR, default_profile_name, get_profile


def notebooks() -> list:
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="profile name (default: $SAE_PROFILE)")
    ap.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 01 02")
    a = ap.parse_args(argv)
    import nbformat
    from nbclient import NotebookClient

    P = get_profile(a.profile or default_profile_name())
    os.environ[ENV_VAR] = P.name  # the kernels inherit it
    out_dir = P.cache_dir / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in notebooks() if not a.only or any(p.name.startswith(o) for o in a.only)]
    print(f"profile {P.name}: running {len(todo)} notebook(s); results in {out_dir}")
    for path in todo:
        t = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=None, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
            status = "ok"
        except Exception as e:  # keep the partly executed notebook: it shows where it failed
            status = f"FAILED: {type(e).__name__}"
            print(str(e)[-3000:], file=sys.stderr)
        nbformat.write(nb, out_dir / path.name)
        print(f"  {path.name:<32} {status:<12} {time.perf_counter() - t:7.1f} s")
        if status != "ok":
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
