"""The transformers+PEFT reference engine: switching between base and adapters is clean."""

import asyncio

import pytest

from server.core.engine import EngineAdapter, GenerationParams, HfEngine
from server.core.settings import Settings
from server.jobs.training import greedy_answers
from tests.helpers import DEMO

pytestmark = pytest.mark.slow

PROMPTS = {"json_extract": "Extract the person as JSON: Ada is 36 years old and lives in London.",
           "reverse_list": "Reverse the list: apple, river, tiger"}


def test_hf_engine_matches_peft_and_switches_cleanly(base_spec, base_model_dir):
    engine = HfEngine(Settings(engine="hf"), base_model_dir, base_spec.model_id)

    async def ask(prompt: str, adapter: EngineAdapter | None) -> str:
        tok = engine.tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return "".join([c.text async for c in engine.generate(ids, GenerationParams(max_tokens=30, temperature=0), adapter)])

    async def scenario():
        await engine.start()
        out = {}
        for i, (skill, prompt) in enumerate(PROMPTS.items()):
            adapter = EngineAdapter(skill, i + 1, str(DEMO / skill))
            out[skill] = await ask(prompt, adapter)
            out[skill + "/base"] = await ask(prompt, None)
            out[skill + "/again"] = await ask(prompt, adapter)
        return out

    out = asyncio.run(scenario())
    for skill, prompt in PROMPTS.items():
        ref = greedy_answers(base_model_dir, DEMO / skill, [prompt], max_new_tokens=30)[0]
        base = greedy_answers(base_model_dir, None, [prompt], max_new_tokens=30)[0]
        assert out[skill] == out[skill + "/again"] == ref
        assert out[skill + "/base"] == base
        assert out[skill] != out[skill + "/base"]
