"""The score store's Lua scripts (:mod:`indexes.redis_store`): each runs on the keys of one slot, so
one call is atomic on one node and on Redis Cluster alike."""

from __future__ import annotations

from indexes.redis_schema import lua

# Counts what of one song the calibration totals hold, atomically, and returns the change:
# concurrent callers for the same song never count it twice. KEYS[1] = song hash,
# ARGV[1] = the song's prior like rate. Returns {likes delta, expected-likes delta} as strings.
CLAIM_CALIBRATION = lua(
    """
local v = redis.call('HMGET', KEYS[1], '$plays', '$likes', '$claimed_likes', '$claimed_expected')
local plays = tonumber(v[1]) or 0
local likes = tonumber(v[2]) or 0
local expected = plays * tonumber(ARGV[1])
local dl = likes - (tonumber(v[3]) or 0)
local de = expected - (tonumber(v[4]) or 0)
if dl == 0 and de == 0 then return {'0', '0'} end
redis.call('HSET', KEYS[1], '$claimed_likes', likes, '$claimed_expected', string.format('%.17g', expected))
return {tostring(dl), string.format('%.17g', de)}
"""
)


# Writes one song's record, atomically (one key: one slot on a cluster): deletes the model's optional
# fields the record lacks, HSETs its fields, and makes the hash persistent (one the engagement counters
# made, with orphan_ttl_s, is a song's record now). KEYS[1] = the song hash; ARGV = n, the n optional
# fields the record lacks, m, the m optional prefixes (a field under one goes unless the record has it),
# then the record's field/value pairs. Returns how many fields it deleted.
WRITE_SONG = """
local key = KEYS[1]
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[n + 2])
local first = n + m + 3
local drop = {}
for i = 2, n + 1 do drop[#drop + 1] = ARGV[i] end
if m > 0 then
  local new = {}
  for i = first, #ARGV, 2 do new[ARGV[i]] = true end
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if not new[field] then
      for i = n + 3, n + m + 2 do
        if string.sub(field, 1, #ARGV[i]) == ARGV[i] then
          drop[#drop + 1] = field
          break
        end
      end
    end
  end
end
local gone = 0
if #drop > 0 then gone = redis.call('HDEL', key, unpack(drop)) end
redis.call('HSET', key, unpack(ARGV, first))
redis.call('PERSIST', key)
return gone
"""


# KEYS = pairs (rebuilt key, feed key), all in one feed's slot; ARGV[i] = '1' if pair i was rebuilt
# with members (renamed over the feed), '0' if the feed is to be emptied (deleted). A rebuilt key
# already taken by a concurrent replace leaves the feed as that replace made it.
SWAP_REBUILT = """
for i = 1, #ARGV do
  local tmp, key = KEYS[2 * i - 1], KEYS[2 * i]
  if ARGV[i] == '1' then
    if redis.call('EXISTS', tmp) == 1 then redis.call('RENAME', tmp, key) end
  else
    redis.call('DEL', key)
  end
end
return 1
"""


# KEYS = song hashes, then the calibration hash; ARGV = each song's prior like rate.
# CLAIM_CALIBRATION for every song, then the totals incremented: one atomic step.
# Returns the new totals {likes, expected}.
CLAIM_CALIBRATION_MANY = lua(
    """
local n = #KEYS - 1
local cal = KEYS[#KEYS]
local d_likes, d_expected = 0, 0
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], '$plays', '$likes', '$claimed_likes', '$claimed_expected')
  local plays = tonumber(v[1]) or 0
  local likes = tonumber(v[2]) or 0
  local expected = plays * tonumber(ARGV[i])
  local dl = likes - (tonumber(v[3]) or 0)
  local de = expected - (tonumber(v[4]) or 0)
  if dl ~= 0 or de ~= 0 then
    redis.call('HSET', KEYS[i], '$claimed_likes', likes, '$claimed_expected', string.format('%.17g', expected))
    d_likes = d_likes + dl
    d_expected = d_expected + de
  end
end
if d_likes ~= 0 or d_expected ~= 0 then
  redis.call('HINCRBYFLOAT', cal, '$total_likes', string.format('%.17g', d_likes))
  redis.call('HINCRBYFLOAT', cal, '$total_expected', string.format('%.17g', d_expected))
end
return redis.call('HMGET', cal, '$total_likes', '$total_expected')
"""
)
