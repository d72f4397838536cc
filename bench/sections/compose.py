"""Section 3, composition speed: Mosaic vs PEFT, from bench/reports/compose.json (``--rerun-compose``
reruns bench/compose.py first: ~10 min, most of it PEFT's dense SVDs)."""

from __future__ import annotations

import argparse
import json
import sys

from bench.scoring import markdown_table
from bench.sections import REPORTS, ROOT


def run(args: argparse.Namespace) -> dict:
    rerun = args.rerun_compose
    if rerun:
        import subprocess

        subprocess.run([sys.executable, "-m", "bench.compose"], cwd=ROOT, check=True)
    path = REPORTS / "compose.json"
    if not path.exists():
        return {"missing": "run python -m bench.compose (or bench.run --rerun-compose)"}
    data = json.loads(path.read_text())
    data["source"] = "rerun now" if rerun else "the committed bench/reports/compose.json (an earlier run; --rerun-compose reruns it)"
    return data


def render(c: dict, quick: bool) -> tuple[list[str], list[str]]:
    L = ["## 3. Composition speed", ""]
    if "llama" not in c:
        return L + [c.get("missing", "not measured"), ""], []
    ll = c["llama"]
    L += [f"From `python -m bench.compose`, {c.get('source', '')}; details in [compose.md](compose.md). Mosaic `svd` vs "
          "PEFT `add_weighted_adapter(svd)`, K = 4 rank-16 adapters on Llama-2-7B shapes, per layer.", "",
          *markdown_table(["", "seconds per layer", "peak MiB above inputs", "relative error"], [
              ["Mosaic", ll["mosaic"]["seconds"] / ll["mosaic"]["layers"], ll["mosaic"]["peak_mib"], ll["mosaic"]["error"]],
              ["PEFT", ll["peft"]["seconds"] / ll["peft"]["layers"], ll["peft"]["peak_mib"], ll["peft"]["error"]]]),
          "", f"**Mosaic / PEFT speed: {ll['ratio']:.0f}×** per layer at equal error.", ""]
    return L, [f"| compose speed, Mosaic svd vs PEFT svd (7B shapes) | {ll['ratio']:.0f}× faster per layer, same error |"]
