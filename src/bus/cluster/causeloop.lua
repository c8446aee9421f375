#!lua name=causeloop

-- causeloop-stream's Redis function library (wire format version 2). The nodes load it on every
-- server they publish to; a backend publishing straight to Redis calls the same function, so
-- that every event of a workspace gets its position from one place. docs/cluster.md documents
-- the keys and arguments.
--
-- FCALL causeloop_publish  2 <base>:meta <base>:history <channel> <size> <ttl_ms> <event>
-- FCALL causeloop_spublish 2 <base>:meta <base>:history <channel> <size> <ttl_ms> <event>
--
-- In one atomic step: take the workspace's next offset (a new epoch when its meta is missing),
-- append the message to the workspace's history stream (entry id <offset>-0; trimmed to <size>
-- entries and, 8 entries every 8 events, to those younger than <ttl_ms>), and PUBLISH (SPUBLISH on
-- a Redis Cluster) the message carrying its position. <event> is one JSON object without a
-- position: {"type":...,"ts":...,["user_id":...,]"payload":{...}}. Returns the offset.
--
-- FCALL causeloop_fence 2 <base>:meta <base>:history <epoch>
--
-- Starts a new epoch if the workspace is still in <epoch>: a node calls it when it saw the
-- offsets of that epoch go backwards (a failover that lost writes), so that every node and every
-- resume record of the old epoch learns that its history is gone. Returns the epoch now in force.

-- An idle workspace's epoch and offset are kept this long after its last event (then a new epoch
-- begins). Nodes take an epoch change after such an idle time as harmless.
local META_IDLE_MS = 86400000
-- Entries aged out at most per check, one check every this many events: a bounded cost per call
-- that keeps up with a stream whose entries age out one per event.
local AGE_TRIM_PER_CALL = 8

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function new_epoch(meta, hist, now, old)
  local epoch = string.format('%d', now)
  if epoch == old then
    epoch = string.format('%d', now + 1)
  end
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  return epoch
end

local function publish(keys, args, verb)
  local meta, hist = keys[1], keys[2]
  local channel, event = args[1], args[4]
  local size, ttl = tonumber(args[2]), tonumber(args[3])
  if not channel or not event then
    return redis.error_reply('ERR causeloop: expected <channel> <size> <ttl_ms> <event>')
  end
  if not size or size < 1 or size ~= math.floor(size) then
    return redis.error_reply('ERR causeloop: <size> must be a whole number of events, at least 1')
  end
  if not ttl or ttl < 1 or ttl ~= math.floor(ttl) then
    return redis.error_reply('ERR causeloop: <ttl_ms> must be a whole number of milliseconds, at least 1')
  end
  if string.sub(event, 1, 1) ~= '{' or string.sub(event, -1) ~= '}' or string.len(event) < 3 then
    return redis.error_reply('ERR causeloop: <event> must be a JSON object with type, ts and payload')
  end
  local now = now_ms()
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch(meta, hist, now, nil)
  end
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  local message = '{"v":2,"epoch":' .. epoch .. ',"offset":' .. string.format('%d', offset) .. ','
    .. string.sub(event, 2)
  redis.call('XADD', hist, 'MAXLEN', string.format('%d', size), string.format('%d-0', offset),
    'm', message, 't', string.format('%d', now))
  -- Age: every AGE_TRIM_PER_CALL events, the oldest that many entries go if older than the TTL
  -- (checking on every call would cost more than the rest of the call; a stream with nothing
  -- younger than the TTL expires as a whole below).
  local cutoff = now - ttl
  local oldest = {}
  if offset % AGE_TRIM_PER_CALL == 0 then
    oldest = redis.call('XRANGE', hist, '-', '+', 'COUNT', AGE_TRIM_PER_CALL)
  end
  local keep_from = nil
  for _, entry in ipairs(oldest) do
    local fields = entry[2]
    local ts = nil
    for i = 1, #fields, 2 do
      if fields[i] == 't' then ts = tonumber(fields[i + 1]) end
    end
    if ts and ts < cutoff then
      keep_from = tonumber(string.match(entry[1], '^(%d+)')) + 1
    else
      break
    end
  end
  if keep_from then
    redis.call('XTRIM', hist, 'MINID', string.format('%d-0', keep_from))
  end
  -- A stream with no event younger than the TTL has nothing to give: it goes by itself.
  redis.call('PEXPIRE', hist, ttl)
  redis.call('PEXPIRE', meta, META_IDLE_MS)
  redis.call(verb, channel, message)
  return offset
end

local function fence(keys, args)
  local meta, hist = keys[1], keys[2]
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch and epoch == args[1] then
    epoch = new_epoch(meta, hist, now_ms(), epoch)
    redis.call('PEXPIRE', meta, META_IDLE_MS)
  end
  return epoch
end

redis.register_function('causeloop_publish', function(keys, args)
  return publish(keys, args, 'PUBLISH')
end)
redis.register_function('causeloop_spublish', function(keys, args)
  return publish(keys, args, 'SPUBLISH')
end)
redis.register_function('causeloop_fence', fence)
