"""vLLM's own offline engine, as the reference for the server's output (run as a subprocess).

    python offline_generate.py MODEL_DIR REQUESTS.json OUT.json
REQUESTS: [{"prompt_ids": [...], "max_tokens": n, "lora": null | {"name", "id", "path"}}]
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    model_dir, req_file, out_file = sys.argv[1:4]
    reqs = json.loads(open(req_file).read())
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, enable_lora=True, max_loras=4,
              max_lora_rank=64, max_model_len=2048, gpu_memory_utilization=0.4)
    out = []
    for r in reqs:
        lora = LoRARequest(r["lora"]["name"], r["lora"]["id"], r["lora"]["path"]) if r["lora"] else None
        res = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"])],
                           SamplingParams(temperature=0, max_tokens=r["max_tokens"]), lora_request=lora)
        out.append({"text": res[0].outputs[0].text, "token_ids": list(res[0].outputs[0].token_ids)})
    open(out_file, "w").write(json.dumps(out))


if __name__ == "__main__":
    main()
