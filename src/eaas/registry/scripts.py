"""The registry's Lua scripts: each multi-key change of a worker's lease runs atomically in Redis.

Worker registration (record, shard set, index and every hosting set, plus a fresh epoch
from ``{prefix}:epoch``), heartbeats (renew + stats, or report a lost lease), the lease
reaper and state changes. Redis runs a script without interleaving other commands
(redis.io, "Scripting with Lua"), so no reader ever sees half a registration and there is
no check-then-act race between processes.
"""

# KEYS: worker hash, workers index, shard set, events channel
# ARGV: ttl_ms, worker id, n fields, field/value pairs..., then function ids
REGISTER_WORKER = """
local ttl = tonumber(ARGV[1]); local wid = ARGV[2]; local nf = tonumber(ARGV[3])
local prefix = ARGV[4]
local fields = {}
for i = 5, 4 + 2 * nf do fields[#fields + 1] = ARGV[i] end
for i = 5 + 2 * nf, #ARGV do
  if redis.call('EXISTS', prefix .. ':function:' .. ARGV[i]) == 0 then
    return redis.error_reply('unknown function ' .. ARGV[i])
  end
end
local epoch = redis.call('INCR', prefix .. ':epoch')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[1], 'epoch', epoch)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], wid)
redis.call('DEL', KEYS[3])
for i = 5 + 2 * nf, #ARGV do
  redis.call('SADD', KEYS[3], ARGV[i])
  redis.call('SADD', prefix .. ':function:' .. ARGV[i] .. ':replicas', wid)
end
return epoch
"""

# KEYS: worker hash. ARGV: ttl_ms, field/value pairs. Returns the state, or false if the lease is gone.
HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return redis.call('HGET', KEYS[1], 'state')
"""

# KEYS: workers index. ARGV: prefix, [only this worker id]. Removes workers whose lease is gone
# (or the given worker unconditionally) from the index and every hosting set; returns their ids.
REAP = """
local prefix = ARGV[1]
local ids
if ARGV[2] then ids = {ARGV[2]} else ids = redis.call('SMEMBERS', KEYS[1]) end
local gone = {}
for _, wid in ipairs(ids) do
  local wkey = prefix .. ':worker:' .. wid
  if ARGV[2] or redis.call('EXISTS', wkey) == 0 then
    local shard = wkey .. ':shard'
    for _, fid in ipairs(redis.call('SMEMBERS', shard)) do
      redis.call('SREM', prefix .. ':function:' .. fid .. ':replicas', wid)
    end
    redis.call('DEL', shard, wkey, wkey .. ':extra')
    if redis.call('SREM', KEYS[1], wid) == 1 then gone[#gone + 1] = wid end
  end
end
return gone
"""

# KEYS: worker hash. ARGV: state. Sets the state if the worker exists; returns 1/0.
SET_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"""

# KEYS: worker hash, shard set. ARGV: prefix, worker id, n added, added ids..., removed ids...
# Adds/removes functions a live worker hosts (shard set and hosting sets); returns the number of
# changes, or -1 when the worker's lease is gone. Unknown functions are refused.
UPDATE_HOSTING = """
local prefix = ARGV[1]; local wid = ARGV[2]; local na = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 4, 3 + na do
  if redis.call('EXISTS', prefix .. ':function:' .. ARGV[i]) == 0 then
    return redis.error_reply('unknown function ' .. ARGV[i])
  end
end
local changed = 0
for i = 4, 3 + na do
  changed = changed + redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('SADD', prefix .. ':function:' .. ARGV[i] .. ':replicas', wid)
end
for i = 4 + na, #ARGV do
  changed = changed + redis.call('SREM', KEYS[2], ARGV[i])
  redis.call('SREM', prefix .. ':function:' .. ARGV[i] .. ':replicas', wid)
end
return changed
"""
