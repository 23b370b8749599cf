//! The Lua scripts the nodes run in Redis, each loaded once and called by its hash
//! (`EVALSHA`; a Redis that started afresh has them loaded again).

use ::redis::Script;

/// GCRA with the server's clock, in microseconds (below 2^53, exact in Lua's doubles).
/// KEYS[1]: the user's bucket. ARGV: emission interval, burst tolerance (µs).
/// Returns `{1, 0}` when admitted, `{0, retry_after_us}` when not.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then
  return {0, ahead - tolerance}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {1, 0}
";

/// Admits one call: the user's rate, then one of the user's slots, and, when asked,
/// one of the cluster's slots on top; one round trip. A call the rate refuses takes
/// nothing; a call that finds no slot of its user's free spends no rate; the cluster's
/// slot is taken only if one is free (otherwise the call asks for it later).
/// KEYS[1]: the user's leases (member → expiry, server ms); KEYS[2]: the user's
/// bucket (GCRA, µs); KEYS[3], when ARGV[6] > 0: the cluster's leases.
/// ARGV: the user's limit, the lease length (ms), the lease's name, the emission
/// interval and burst tolerance (µs; an interval of 0: no rate), the cluster's limit
/// (0: take none), how many of the user's leases to give back, their names, then the
/// names of the cluster's leases to give back (only with KEYS[3]): the calls that just
/// ended on this node, given back first, whatever the answer. Returns `{1, 0, 1|0}`
/// admitted (with a cluster slot or not), `{0, retry_after_us, 0}` over the rate,
/// `{2, 0, 0}` no slot free.
/// Every Redis command a script runs costs about as much as a small request's work
/// on the server, so this one runs as few as it can: leases are counted unexpired
/// (`ZCOUNT`) rather than pruned first; the expired ones (of a node that died) are
/// removed when a call is refused for want of a slot, by one admission in eight (on
/// the server's clock) and every renewal, or with the key.
const ADMIT: &str = r"
local users = tonumber(ARGV[7])
if users > 0 then
  redis.call('ZREM', KEYS[1], unpack(ARGV, 8, 7 + users))
end
if #ARGV > 7 + users then
  redis.call('ZREM', KEYS[3], unpack(ARGV, 8 + users))
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local lease = tonumber(ARGV[2])
local interval = tonumber(ARGV[4])
local tat = now_us
if interval > 0 then
  tat = tonumber(redis.call('GET', KEYS[2]) or now_us)
  if tat < now_us then tat = now_us end
  local ahead = tat - now_us
  local tolerance = tonumber(ARGV[5])
  if ahead > tolerance then
    return {0, ahead - tolerance, 0}
  end
end
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') >= tonumber(ARGV[1]) then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  return {2, 0, 0}
end
if now % 8 == 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease * 2)
if interval > 0 then
  local next_tat = tat + interval
  redis.call('SET', KEYS[2], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now_us) / 1000) + 1)
end
local cluster = tonumber(ARGV[6])
if cluster > 0 then
  if redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') < cluster then
    redis.call('ZADD', KEYS[3], now + lease, ARGV[3])
    redis.call('PEXPIRE', KEYS[3], lease * 2)
    return {1, 0, 1}
  end
end
return {1, 0, 0}
";

/// Takes a pending approval: returns the node that holds the call and deletes the
/// key, so that exactly one claim ever gets it; `nil` when there is none.
const CLAIM: &str = r"
local owner = redis.call('GET', KEYS[1])
if not owner then return false end
redis.call('DEL', KEYS[1])
return owner
";

/// Takes one slot if fewer than ARGV[1] unexpired leases are held (a user's slot
/// once its call is approved, or a cluster's slot not taken with the call's
/// admission). KEYS[1]: the sorted set of leases (member → expiry, server ms).
/// ARGV: the limit, the lease length (ms), the lease's name. Returns 1 or 0.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 0
";

/// Extends a held lease (ARGV: lease length in ms, the lease's name), and removes the
/// expired ones beside it; 1 when it was still held, 0 when it had expired meanwhile.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
";

/// Appends one frame. KEYS[1]: the run's stream; KEYS[2]: the user's runs (run id →
/// last append, server ms). ARGV: the frame's JSON object text (from its `{`), the
/// stream's length, its time to live (ms), the user's most runs, the run id, and the
/// key of the user's runs without the run id. Returns the frame's seq.
const APPEND: &str = r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq = 1
if last[1] then seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
local id = string.format('%d', seq)
local body = string.sub(ARGV[1], 2)
local sep = ','
if string.sub(body, 1, 1) == '}' then sep = '' end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id .. '-0', 'f', '{"seq":' .. id .. sep .. body)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
while redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[4]) do
  local old = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  redis.call('ZREM', KEYS[2], old)
  if old ~= ARGV[5] then redis.call('DEL', ARGV[6] .. old) end
end
return seq
"#;

/// Marks a run as followed by a node, only if the run exists: a run nobody wrote
/// (an unknown id a client asked to resume) leaves no key behind. KEYS[1]: the run's
/// stream; KEYS[2]: its mark. ARGV: the node, the mark's time to live (ms). Returns 1
/// when marked.
const MARK: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Every script, hashed once per handle.
pub(super) struct Scripts {
    pub(super) admit: Script,
    pub(super) gcra: Script,
    pub(super) claim: Script,
    pub(super) acquire: Script,
    pub(super) renew: Script,
    pub(super) append: Script,
    pub(super) mark: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            admit: Script::new(ADMIT),
            gcra: Script::new(GCRA),
            claim: Script::new(CLAIM),
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            append: Script::new(APPEND),
            mark: Script::new(MARK),
        }
    }
}
