"""Train the demo skills on the bundled base model and save them under bench/skills/<name>/.

    python -m bench.train_demo_skills [--steps 80] [--only NAME] [--force]

Each folder gets the PEFT files plus ``mosaic.json`` (description, example prompts, and the
exact-match scores of the base model and the skill on held-out test prompts). A skill whose
folder already exists is kept (the adapters are committed; training is only for refreshing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.demo_data import SKILLS, examples, exact_match
from server.base_model import base_model_id, prepare
from server.settings import get_settings
from server.training import greedy_answers, train_lora

OUT = Path(__file__).parent / "skills"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--only", action="append")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-test", type=int, default=30)
    args = ap.parse_args()
    settings = get_settings()
    base = prepare(settings)
    for name in args.only or list(SKILLS):
        folder = OUT / name
        if folder.exists() and not args.force:
            print(f"{name}: kept ({folder})")
            continue
        t0 = time.time()
        data = examples(name, "train", 400)
        adapter = train_lora(
            base, data, steps=args.steps, base_model_id=base_model_id(settings),
            on_step=lambda s, l: print(f"{name} step {s + 1}/{args.steps} loss {l:.3f}", flush=True) if s % 10 == 9 else None,
        )
        adapter.save_dir(folder)
        test = examples(name, "test", args.n_test)
        prompts = [p for p, _ in test]
        skill_out = greedy_answers(base, folder, prompts)
        base_out = greedy_answers(base, None, prompts)
        meta = {
            "description": SKILLS[name]["description"],
            "examples": [p for p, _ in examples(name, "train", 6, seed=1)],
            "exact_match": {
                "skill": sum(exact_match(o, a) for o, (_, a) in zip(skill_out, test)) / len(test),
                "base": sum(exact_match(o, a) for o, (_, a) in zip(base_out, test)) / len(test),
            },
            "train": {"steps": args.steps, "seconds": round(time.time() - t0, 1)},
        }
        (folder / "mosaic.json").write_text(json.dumps(meta, indent=2))
        print(f"{name}: {meta['exact_match']} in {meta['train']['seconds']} s; sample: {skill_out[0]!r}", flush=True)


if __name__ == "__main__":
    main()
