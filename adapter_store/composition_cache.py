"""Cached composition results in Redis, within a byte budget, least recently used out first.

Any inference client can ask for a composition nobody asked for before, so the cache has to be
bounded: each result is stored once (``P:c:KEY``, the same fields as a skill version plus ``inputs``),
its size counted, and the least recently used ones dropped whenever the total passes the budget.
A result is also dropped when a skill content it was made from is no longer in the library.

Layout (``P`` is the registry's key prefix):

``P:c:KEY``              HASH {meta, config, weights, inputs}: one composition result
``P:cache:lru``          ZSET KEY -> time of last use
``P:cache:size``         HASH KEY -> bytes stored for it
``P:cache:bytes``        the sum of those sizes
``P:cache:by:CONTENT``   SET of the KEYs made from the skill content CONTENT (a content id)

Puts, touches and evictions are Lua scripts, so replicas sharing one Redis never count a result twice
or evict one that another replica has just stored (each script is atomic). The scripts build the
keys they touch from the prefix, so the cache needs a single Redis node, as the registry does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis

from lora.adapter import LoraAdapter

# The scripts share one preamble: drop(KEY) removes a result and its bookkeeping; evict(BUDGET) drops the
# least recently used while the total is over BUDGET bytes (a negative BUDGET evicts nothing). Each
# script returns the KEYs it dropped.
_PREAMBLE = """
local p = ARGV[1]
local lru, sizes, total = p .. 'cache:lru', p .. 'cache:size', p .. 'cache:bytes'
local dropped = {}
local function drop(key)
  local inputs = redis.call('HGET', p .. 'c:' .. key, 'inputs')
  if inputs then
    for _, content in ipairs(cjson.decode(inputs)) do redis.call('SREM', p .. 'cache:by:' .. content, key) end
  end
  redis.call('DEL', p .. 'c:' .. key)
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, key) or '0'))
  redis.call('HDEL', sizes, key)
  redis.call('ZREM', lru, key)
  table.insert(dropped, key)
end
local function evict(budget)
  while budget >= 0 and tonumber(redis.call('GET', total) or '0') > budget do
    local oldest = redis.call('ZRANGE', lru, 0, 0)
    if #oldest == 0 then break end
    drop(oldest[1])
  end
end
"""

# ARGV: prefix, budget, KEY...: drops each KEY, then evicts to the budget.
_DROP = _PREAMBLE + """
for i = 3, #ARGV do drop(ARGV[i]) end
evict(tonumber(ARGV[2]))
return dropped
"""

# ARGV: prefix, CONTENT...: drops every result made from any CONTENT (one script: a put racing it is
# either dropped too or indexed after it).
_DROP_MADE_FROM = _PREAMBLE + """
for i = 2, #ARGV do
  for _, key in ipairs(redis.call('SMEMBERS', p .. 'cache:by:' .. ARGV[i])) do drop(key) end
end
return dropped
"""

# ARGV: prefix, budget, KEY, now, meta, config, weights, inputs (a JSON list of content ids): stores KEY
# as used now, then evicts to the budget (KEY itself goes when it alone is over the budget).
_PUT = _PREAMBLE + """
local key = ARGV[3]
local size = #ARGV[5] + #ARGV[6] + #ARGV[7]
local old = tonumber(redis.call('HGET', sizes, key) or '0')
local before = redis.call('HGET', p .. 'c:' .. key, 'inputs')
if before then
  for _, content in ipairs(cjson.decode(before)) do redis.call('SREM', p .. 'cache:by:' .. content, key) end
end
redis.call('HSET', p .. 'c:' .. key, 'meta', ARGV[5], 'config', ARGV[6], 'weights', ARGV[7], 'inputs', ARGV[8])
redis.call('HSET', sizes, key, size)
redis.call('INCRBY', total, size - old)
redis.call('ZADD', lru, ARGV[4], key)
for _, content in ipairs(cjson.decode(ARGV[8])) do redis.call('SADD', p .. 'cache:by:' .. content, key) end
evict(tonumber(ARGV[2]))
return dropped
"""

# ARGV: prefix, KEY: counts a result stored before the cache had a budget, as least recently used.
# Returns 1 when it was counted now.
_ADOPT = """
local p, key = ARGV[1], ARGV[2]
local c = p .. 'c:' .. key
if redis.call('HEXISTS', p .. 'cache:size', key) == 1 or redis.call('TYPE', c).ok ~= 'hash' then return 0 end
local size = redis.call('HSTRLEN', c, 'meta') + redis.call('HSTRLEN', c, 'config') + redis.call('HSTRLEN', c, 'weights')
redis.call('HSET', p .. 'cache:size', key, size)
redis.call('INCRBY', p .. 'cache:bytes', size)
redis.call('ZADD', p .. 'cache:lru', 0, key)
return 1
"""


class CompositionCache:
    def __init__(self, client: redis.Redis, prefix: str, budget_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.prefix = prefix
        self.budget = budget_bytes
        self.clock = clock
        self._drop = client.register_script(_DROP)
        self._put = client.register_script(_PUT)
        self._adopt = client.register_script(_ADOPT)
        self._drop_made_from = client.register_script(_DROP_MADE_FROM)

    def _k(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def put(self, key: str, adapter: LoraAdapter, meta: dict, inputs: list[str]) -> list[str]:
        """Store one result, made from the skill contents ``inputs``; returns the keys evicted to stay
        within the budget (``key`` itself when it alone is larger than the budget)."""
        return [k.decode() for k in self._put(args=[
            f"{self.prefix}:", self.budget, key, self.clock(), json.dumps(meta), adapter.config_bytes(),
            adapter.weights_bytes(), json.dumps(sorted(set(inputs))),
        ])]

    def get(self, key: str) -> tuple[dict, LoraAdapter] | None:
        """The stored result, marked as just used; None when absent (never stored, or evicted)."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hmget(self._k("c", key), ["meta", "config", "weights"])
            pipe.zadd(self._k("cache", "lru"), {key: self.clock()}, xx=True)
            (meta, config, weights), _ = pipe.execute()
        if meta is None or config is None or weights is None:
            return None
        return json.loads(meta), LoraAdapter.from_bytes(config, weights)

    def made_from(self, content: str) -> set[str]:
        return {k.decode() for k in self.r.smembers(self._k("cache", "by", content))}

    def drop_made_from(self, contents: list[str]) -> list[str]:
        """Drop every result made from any of ``contents``; returns their keys."""
        if not contents:
            return []
        return sorted({k.decode() for k in self._drop_made_from(args=[f"{self.prefix}:", *contents])})

    def evict(self) -> list[str]:
        """Evict down to the budget now (it is also done on every put); returns the keys evicted."""
        return [k.decode() for k in self._drop(args=[f"{self.prefix}:", self.budget])]

    def stored_bytes(self) -> int:
        return int(self.r.get(self._k("cache", "bytes")) or 0)

    def keys(self) -> list[str]:
        """Stored keys, least recently used first."""
        return [k.decode() for k in self.r.zrange(self._k("cache", "lru"), 0, -1)]

    def adopt_untracked(self) -> int:
        """Count results stored before the cache had a budget (as least recently used); returns how many."""
        prefix = self._k("c", "")
        return sum(int(self._adopt(args=[f"{self.prefix}:", raw.decode().removeprefix(prefix)]))
                   for raw in self.r.scan_iter(match=prefix + "*", count=1000))
