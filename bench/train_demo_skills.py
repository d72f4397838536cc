"""Train the demo skills with `mosaic skills train` and save them under bench/skills/<name>/.

    python -m bench.train_demo_skills [--steps 40] [--only NAME] [--force]
    python -m bench.train_demo_skills --library      # the variants below, into bench/skills_library/

The library variants (other seeds, smaller training sets) exist for the MoS storage benchmark, which
needs a library larger than the eight demo skills: ``json_extract-s1`` is json_extract trained on data
of seed 1 with training seed 1, ``date_iso-n100`` on 100 examples (seed 2) instead of 400.

Each skill's generated data is written as a JSONL file and trained by the real CLI
(`mosaic skills train`, into a throw-away Redis key prefix), then exported with
`mosaic skills export`. Each folder gets the PEFT files plus ``mosaic.json`` (description, example
prompts, and the exact-match scores of the base model and the skill on held-out test prompts). A
skill whose folder already exists is kept (the adapters are committed; training is only for refreshing).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import redis

from bench.demo_data import SKILLS, exact_match, examples
from server.cli.launch import mosaic_cli
from server.core.base_model import prepare
from server.core.settings import get_settings
from server.jobs.training import greedy_answers

OUT = Path(__file__).parent / "skills"
LIBRARY = Path(__file__).parent / "skills_library"
STEPS = {"french_color": 80, "date_iso": 30, "km_to_m": 30, "extract_email": 30}  # as the demo skills were trained


def variants() -> dict[str, dict]:
    """name -> {skill, seed, n_train}: every demo skill with seed 1, four of them also on 100 examples."""
    out = {f"{s}-s1": {"skill": s, "seed": 1, "n_train": 400} for s in SKILLS}
    for s in ("json_extract", "sentiment", "date_iso", "km_to_m"):
        out[f"{s}-n100"] = {"skill": s, "seed": 2, "n_train": 100}
    return out


def train_with_cli(name: str, steps: int, folder: Path, skill: str | None = None, seed: int = 0,
                   n_train: int = 400) -> dict:
    """`mosaic skills train` on the generated data of ``skill`` (default: ``name``), then
    `mosaic skills export` to ``folder``."""
    skill = skill or name
    env = dict(os.environ, MOSAIC_REDIS_PREFIX=f"mosaic-train-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in examples(skill, "train", n_train, seed=seed)))
        try:
            done = mosaic_cli(env, "skills", "train", str(data), "--name", name, "--steps", str(steps),
                              "--description", SKILLS[skill]["description"], "--seed", str(seed), "--json",
                              timeout=7200)
            if done.returncode:
                raise SystemExit(f"training {name} failed:\n{done.stderr[-3000:]}")
            exported = mosaic_cli(env, "skills", "export", name, str(folder))
            if exported.returncode:
                raise SystemExit(f"exporting {name} failed:\n{exported.stderr[-3000:]}")
        finally:
            client = redis.Redis.from_url(get_settings().redis_url)
            keys = list(client.scan_iter(match=f"{env['MOSAIC_REDIS_PREFIX']}:*"))
            if keys:
                client.delete(*keys)
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", action="append")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument("--library", action="store_true", help="train the library variants into bench/skills_library/")
    args = ap.parse_args()
    base = prepare(get_settings())
    plan = variants() if args.library else {s: {"skill": s, "seed": 0, "n_train": 400} for s in SKILLS}
    for name in args.only or list(plan):
        spec = plan[name]
        skill = spec["skill"]
        folder = (LIBRARY if args.library else OUT) / name
        if folder.exists() and not args.force:
            print(f"{name}: kept ({folder})")
            continue
        t0 = time.time()
        steps = STEPS.get(skill, args.steps) if args.library else args.steps
        trained = train_with_cli(name, steps, folder, skill, spec["seed"], spec["n_train"])
        test = examples(skill, "test", args.n_test)
        prompts = [p for p, _ in test]
        skill_out = greedy_answers(base, folder, prompts)
        base_out = greedy_answers(base, None, prompts)
        meta = {
            "description": SKILLS[skill]["description"],
            "examples": [p for p, _ in examples(skill, "train", 6, seed=1)],
            "skill": skill,
            "exact_match": {
                "skill": sum(exact_match(o, a) for o, (_, a) in zip(skill_out, test)) / len(test),
                "base": sum(exact_match(o, a) for o, (_, a) in zip(base_out, test)) / len(test),
            },
            "train": {"steps": steps, "seed": spec["seed"], "n_train": spec["n_train"],
                      "seconds": round(time.time() - t0, 1), "command": "mosaic skills train",
                      "val_exact_match": trained.get("val_exact_match")},
        }
        (folder / "mosaic.json").write_text(json.dumps(meta, indent=2))
        print(f"{name}: {meta['exact_match']} in {meta['train']['seconds']} s; sample: {skill_out[0]!r}", flush=True)


if __name__ == "__main__":
    main()
