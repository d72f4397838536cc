"""Every setting of Mosaic, read once from the environment (``MOSAIC_*``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from router.policy import RouterConfig
from router.weights import AlphaRule


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOSAIC_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "mosaic"
    # no Redis at a loopback redis_url: start one (persistent, under data_dir/redis). Off inside a Ray
    # cluster, where a replica's loopback is its own node and a Redis of its own would be an empty library
    managed_redis: bool = True
    base_model: str | None = Field(default=None, description="HF causal-LM folder; unset = the bundled SmolLM2-135M-Instruct")
    base_model_id: str | None = Field(default=None, description="the model id clients use; default: the folder's name")
    data_dir: Path = Path("~/.cache/mosaic").expanduser()
    api_key: str | None = None
    require_inference_key: bool = False  # when true, inference endpoints need a key with the 'inference' scope
    # with no key, admin and read are open to loopback clients only (and `mosaic serve` binds nothing
    # else); true opens them to every client that can reach the server (server/edge/auth.py)
    open_admin: bool = False
    # the data dir remembers what Redis must not forget (keys were made, the registry's generation, the highest
    # version number: adapter_store/high_water.py); a Redis behind it (flushed, restored) is refused at start
    # and for writes until a start with this set accepts it (versions then go on above the old ones)
    accept_registry_reset: bool = False
    engine: Literal["vllm", "hf"] = "vllm"

    # engine
    max_lora_rank: int = 64  # one of vLLM's allowed values: 1, 8, 16, 32, 64, 128, 256, 320, 512
    max_loras: int = 4  # adapters resident in one batch
    max_cpu_loras: int = 32  # adapters kept loaded in the engine's cache
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.4
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    dtype: str = "bfloat16"
    # vLLM's tool-call parser for tools/tool_choice (it fits the base model's chat template: the bundled
    # SmolLM2 uses ChatML, whose tool-call convention is Hermes' <tool_call> tags); "" turns tools off
    tool_call_parser: str = "hermes"
    # `mosaic serve` preloads tcmalloc and Intel OpenMP for vLLM's CPU engine (server.core.engine.cpu_preload)
    preload: bool = True
    engine_check_seconds: float = 5.0  # how often a running engine is checked
    engine_restart_seconds: float = 10.0  # first back-off before restarting a failed engine (doubles each time)
    engine_max_restarts: int = 5  # restarts in a row before giving up (health stays "error")

    # router (model="auto"): the policy's name (router/policies.py) and its thresholds, the one place their
    # values are written; bench/route.py measures them on the demo skills' held-out, two-skill and
    # out-of-distribution prompts (bench/reports/REPORT.md, "Routing")
    router: Literal["psec", "lexical"] = "psec"
    router_ood: float = 0.48  # the best skill's similarity below this: the base model serves
    router_mix_similarity: float = 0.34  # another skill joins the top one when the prompt is this close to it ...
    router_mix_min: float = 0.18  # ... and its α is at least this
    router_lexical_min: float = 0.2  # the lexical policy: TF-IDF cosine below this, the base model serves
    # after a library change the router retrains in the background: a request waits for it at most this
    # long, then routes with the model it has (a new skill is routable once training is done)
    router_train_wait_seconds: float = Field(default=1.0, ge=0.0)
    # retrieve-then-compose (router/retrieval.py): α among the top_k skills nearest the prompt; up to
    # router_lr_max_skills skills α comes from the trained network, above from a softmax of the candidates'
    # similarities at router_temperature (chosen on 1,000 synthetic skills' held-out prompts: 0.1 composes two
    # skills that stand out from the other candidates but rarely two near-tied ones, bench/scale.py)
    router_top_k: int = Field(default=16, ge=1)
    router_lr_max_skills: int = Field(default=200, ge=0)
    router_temperature: float = Field(default=0.1, gt=0.0)
    # α -> composition weights (model="auto" and "weights": "auto"): the strongest skill at 1, the others
    # α_i/α_max rounded to this grid (below half a step: dropped), at most router_max_skills nonzero
    alpha_grid: float = Field(default=0.25, gt=0.0, le=1.0)
    router_max_skills: int = Field(default=3, ge=1)

    # limits: each refused with a 4xx before any work is done
    max_adapter_rank: int = 256  # uploads with a higher LoRA rank are refused (400)
    max_upload_mb: int = 512  # upload body / unpacked archive size (413)
    # what one skill may carry (400): its weights file's tensors, counted from the safetensors header before
    # anything is loaded (a LoRA on the 7 linear modules of every layer of an 80-layer model has 1,120), and the
    # text the router embeds and Redis keeps, checked on upload and on POST /v1/compositions: example prompts,
    # their length (MiniLM reads about the first 2,000 characters), the description, tags and their length
    max_tensors: int = Field(default=4096, ge=1)
    max_examples_per_skill: int = Field(default=64, ge=0)
    max_example_chars: int = Field(default=2000, ge=1)
    max_description_chars: int = Field(default=2000, ge=0)
    max_tags: int = Field(default=32, ge=0)
    max_tag_chars: int = Field(default=64, ge=1)
    max_request_mb: int = 8  # any other request body (413)
    max_composition_skills: int = 16  # skills in one composition (400)
    # one composition's estimated cost (composer/cost.py), refused with a 400 over either; measured on the
    # bundled model: a 16-skill TIES ≈ 6e10, a 16-skill rank-64 LEGO with 16 restarts ≈ 5e14
    max_compose_work: float = 2e12  # multiply-adds
    max_compose_gib: float = 4.0  # peak working set of one module
    compose_workers: int = Field(default=1, ge=1)  # threads that compose, for every path that composes
    # a learned-weight search (optimize): the examples it scores (each also within max_prompt_chars and
    # max_prompt_tokens, prompt and answer together), and the tokens the reference model reads over the whole
    # search, counted as budget × examples × the longest example; the default is about 1.5 hours of the
    # bundled model on 2 CPU cores (~100 tokens/s measured), three LoraHub-sized searches (40 × 20 × 200)
    max_examples: int = Field(default=256, ge=1)
    max_job_tokens: int = Field(default=500_000, ge=1)
    max_searches: int = Field(default=2, ge=1)  # searches running at once, all namespaces (409 beyond)
    # what past requests leave behind, least recently used out first: composition results in Redis
    # (shared by replicas) and the engine's adapter folders on each replica's disk
    composition_cache_mb: int = Field(default=1024, ge=0)
    adapter_disk_mb: int = Field(default=8192, ge=1)  # folders in use included: one that does not fit is a 503
    # a folder used in the last this many seconds is not removed to make room: what an engine handed its path
    # needs to load it (a request holds its own folder until its response is sent, however long that takes)
    adapter_grace_seconds: float = Field(default=60.0, ge=0.0)
    max_prompt_chars: int = 100_000  # characters of prompt or messages, checked before tokenizing (400)
    max_prompt_tokens: int = 2047  # prompt tokens; also capped by max_model_len - 1 (400)
    max_tokens_limit: int = 2048  # tokens generated per request (400 when max_tokens asks for more)
    # what one inference request may buy, each refused with a 4xx before the work: JSON values in any JSON
    # body (counted as its commas and brackets while it arrives: 413; a body within it parses in well under
    # 100 ms, so no request stalls the others), prompts in one completions request and messages in a chat
    # (counted before vLLM's protocol model validates them), choices (n, also the beam width), and generated
    # tokens in all (prompts × n × max_tokens; an unsent max_tokens counts as MOSAIC_MAX_TOKENS_LIMIT)
    max_json_values: int = Field(default=131_072, ge=1)
    max_prompts: int = Field(default=32, ge=1)
    max_messages: int = Field(default=1024, ge=1)  # chat messages (or Responses input items) plus their content parts
    max_choices: int = Field(default=16, ge=1)
    max_request_tokens: int = Field(default=32_768, ge=1)

    def router_config(self) -> RouterConfig:
        return RouterConfig(ood=self.router_ood, mix_similarity=self.router_mix_similarity, mix_min=self.router_mix_min,
                            lexical_min=self.router_lexical_min, train_wait_seconds=self.router_train_wait_seconds,
                            top_k=self.router_top_k, lr_max_skills=self.router_lr_max_skills,
                            temperature=self.router_temperature,
                            rule=AlphaRule(grid=self.alpha_grid, max_skills=self.router_max_skills))

    def text_limits(self):
        """What a skill's examples, description and tags may hold (adapter_store.validation.TextLimits)."""
        from adapter_store.validation import TextLimits

        return TextLimits(examples=self.max_examples_per_skill, example_chars=self.max_example_chars,
                          description_chars=self.max_description_chars, tags=self.max_tags, tag_chars=self.max_tag_chars)

    def model_post_init(self, _ctx: object) -> None:
        self.data_dir = Path(self.data_dir).expanduser()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
