-- Shared by every script of backlane's Redis store: on Redis 7 the store loads this file
-- and every verb as one library of Redis functions (each verb's file the body of one
-- function); on Redis 6.2 it prepends this file to each verb's script. Either way a verb
-- starts with begin(KEYS[1]): KEYS[1] is the lane's key prefix; every key below starts
-- with it, so a prefix with a hash tag ("{app}:") keeps a lane's keys in one cluster slot.
--
-- Keys (P = the prefix):
--   P job:<id>        hash: the job's fields (absent field = None), its store order
--                     (seq), once a job waits for it waited = 1, and on the first job
--                     an enqueue stored, that call's token (tok)
--   P seq             counter giving each stored job its seq
--   P keys            hash: idempotency key -> id of the active job holding it
--   P queues          set: every queue a job was stored in
--   P paused          set: paused queues
--   P prio:<q>        set: priorities that have (or had) claimable jobs in queue q
--   P due:<q>:<p>     zset: claimable jobs of queue q and priority p (score run_at,
--                     member <seq, 16 digits><id>: ties go in store order)
--   P run             zset: running jobs by lease_until
--   P defer           zset: deferred jobs with a release_at, by release_at
--   P wait:<id>       set: jobs whose `after` names <id>
--   P all             zset: every job by created_at (member as in due)
--   P live            zset: the active jobs (deferred, queued, running) by created_at
--   P state:<s>       zset: the jobs that ended in state s by created_at (member as in
--                     due); a job moving between active states changes no index but its
--                     claim order and lease
--   P kept            zset: ended jobs with a keep_until, by keep_until
--   P fin:<s>         zset: jobs that ended in state s, by finished_at
--   P ends:<m>        hash: the jobs stored that ended succeeded, failed or cancelled in
--                     the minute starting at <m> (POSIX seconds, a multiple of 60): how
--                     many in each state (fields named by state), the total of their
--                     waits in microseconds (wait_us) and how many have one (waits); kept
--                     until ENDS_KEPT seconds after <m> (see tally). Jobs that ended before
--                     the tallies existed (an earlier, unreleased layout) are in none: no
--                     migration; stats misses them until their minute is ENDS_KEPT old
--   P ends            zset: the minutes <m> that have a P ends:<m>, by <m>
--   P counts          hash: "<state>:<queue>" -> number of jobs
--   P sched           hash: schedule name -> latest slot taken ("" for none yet)
--   P sched:paused    set: paused schedules
--   P workers         hash: worker id -> JSON record;  P workers:seen  zset by seen_at
--   P idle            set, with an expiry, by a claim that took all there was: a worker
--                     may be waiting, so scripts that make work claimable publish on P wake
--   P claim:<worker>  the token and job ids of the worker's last claim (two minutes)
--   P waiting         hash: worker id -> "<capacity> <lease seconds> <deadline> <queues>"
--                     of each worker blocked in wait_for_work (queues: JSON, '' = any),
--                     written by its wait, or by the claim before it (see claim_jobs)
--   P hand:<worker>   list: batches of jobs handed to a waiting worker (JSON arrays of
--                     their fields), which it pops into  P took:<worker>  (BLMOVE); the
--                     worker's next claim empties both
--   P handed          zset: jobs handed to a waiting worker and not taken yet, by the end
--                     of their short lease (the worker takes one by its claim, or by take)
--
-- A call the client sends again after its connection broke (Redis may have run it) must
-- not act twice: enqueue finds its jobs stored under its token and stores only the rest;
-- claim finds its token in P claim:<worker> and returns the same jobs; claim_slot finds
-- the slot taken with its own job. The other verbs give the same result when repeated.
--
-- Changes to sorted sets and to counts are buffered and applied by flush() at the end of
-- each script, one command per key: a batch of 1000 jobs costs a handful of ZADDs, not
-- thousands. No script reads a sorted set after writing it (claim reads the due sets, and
-- removes what it took at once, before anything is buffered for them).

local P -- the lane's key prefix, set by begin()
local ACTIVE = {deferred = true, queued = true, running = true}
local TERMINAL = {succeeded = true, failed = true, cancelled = true, discarded = true}
local FIELDS = {'state', 'queue', 'priority', 'seq', 'created_at', 'run_at', 'key', 'after',
                'worker_id', 'cancel_requested', 'waited', 'started_at', 'finished_at'}
local ENDED = {succeeded = true, failed = true, cancelled = true} -- the states stats counts
local ENDS_KEPT = 7200
-- Seconds the tallies of a minute are kept after it starts: the dashboard asks for the
-- last hour, and this leaves as much again for clocks that disagree. stats counts the
-- minutes older than that from the jobs themselves.
local woke = false
local hand_over -- defined with hand_off, below
local zsets, zorder, deltas, added = {}, {}, {}, {}
local tallies, tallied = {}, {} -- changes to P ends:<m>, by minute, and the minutes in order

local function zput(key, score, m)
    local t = zsets[key]
    if not t then
        t = {}
        zsets[key] = t
        zorder[#zorder + 1] = key
    end
    t[m] = score
end

local function zdel(key, m)
    local t = zsets[key]
    if not t then
        t = {}
        zsets[key] = t
        zorder[#zorder + 1] = key
    end
    t[m] = false
end

-- Whether this script has buffered an addition to sorted set `key`.
local function buffered(key)
    for _, score in pairs(zsets[key] or {}) do
        if score then
            return true
        end
    end
    return false
end

-- A job changed by hand may name no state or queue: it is counted nowhere.
local function count(state, queue, delta)
    if not (ACTIVE[state] or TERMINAL[state]) or not queue then
        return
    end
    local field = state .. ':' .. queue
    deltas[field] = (deltas[field] or 0) + delta
end

local function sadd_once(key, value)
    local seen = key .. '\n' .. value
    if not added[seen] then
        added[seen] = true
        redis.call('SADD', key, value)
    end
end

local flush_tallies -- defined with tally, below

-- Apply the buffered changes, then tell waiting workers (if any may be waiting) that
-- claimable work appeared.
local function flush()
    for _, key in ipairs(zorder) do
        local put, gone = {}, {}
        for m, score in pairs(zsets[key]) do
            if score then
                put[#put + 1] = score
                put[#put + 1] = m
            else
                gone[#gone + 1] = m
            end
        end
        for i = 1, #put, 2000 do
            redis.call('ZADD', key, unpack(put, i, math.min(i + 1999, #put)))
        end
        for i = 1, #gone, 1000 do
            redis.call('ZREM', key, unpack(gone, i, math.min(i + 999, #gone)))
        end
    end
    local counts = P .. 'counts'
    for field, delta in pairs(deltas) do
        if delta ~= 0 and redis.call('HINCRBY', counts, field, delta) <= 0 then
            redis.call('HDEL', counts, field)
        end
    end
    flush_tallies()
    if woke and redis.call('EXISTS', P .. 'idle') == 1 then
        redis.call('PUBLISH', P .. 'wake', '1')
    end
    hand_over()
end

local function jkey(id)
    return P .. 'job:' .. id
end

-- Whether `value` (a field's text) is a whole number, as seq and priority must be: a field
-- changed by hand may not be.
local function whole(value)
    local n = tonumber(value)
    return n ~= nil and n == math.floor(n) and n > -2 ^ 53 and n < 2 ^ 53
end

-- The member of job <id> in P all, found by its id (a scan: for a job whose seq was
-- changed by hand only), or nil.
local function indexed_member(id)
    local pattern = string.rep('?', 16) .. (string.gsub(id, '[%*%?%[%]\\]', '\\%0'))
    local cursor = '0'
    repeat
        local reply = redis.call('ZSCAN', P .. 'all', cursor, 'MATCH', pattern, 'COUNT', 1000)
        cursor = reply[1]
        if reply[2][1] then
            return reply[2][1]
        end
    until cursor == '0'
    return nil
end

-- The job's member in the listing and claim indexes (its seq, then its id). A seq changed
-- by hand is taken from the index instead.
local function member(job)
    if not whole(job.seq) then
        local m = indexed_member(job.id)
        job.seq = m and string.sub(m, 1, 16) or '0'
    end
    return string.format('%016d', tonumber(job.seq)) .. job.id
end

-- The fields of job <id> the scripts decide on, or nil when there is no such job. With
-- `any`, also a job whose state or queue was changed by hand into one no script can act
-- on (else nil for it too): delete removes it.
local function load(id, any)
    local values = redis.call('HMGET', jkey(id), unpack(FIELDS))
    if not values[1] and not (any and redis.call('EXISTS', jkey(id)) == 1) then
        return nil
    end
    if not any and not ((ACTIVE[values[1]] or TERMINAL[values[1]]) and values[2]) then
        return nil
    end
    local job = {id = id}
    for i, name in ipairs(FIELDS) do
        if values[i] then
            job[name] = values[i]
        end
    end
    return job
end

-- The listing index of the jobs in `state`.
local function state_index(state)
    if ACTIVE[state] or not TERMINAL[state] then
        return P .. 'live'
    end
    return P .. 'state:' .. state
end

-- A priority changed by hand into no whole number counts as 0 here: the claim that meets
-- the job there fails it (its priority does not match).
local function due_key(job)
    return P .. 'due:' .. job.queue .. ':' .. (whole(job.priority) and job.priority or '0')
end

-- Account for a job moving to another state: counts, state indexes and keys. The caller
-- writes the state field itself, with the job's other changed fields.
local function move(job, state)
    local old = job.state
    if old == state then
        return
    end
    count(old, job.queue, -1)
    count(state, job.queue, 1)
    local before, after = state_index(old), state_index(state)
    if before ~= after then
        local m = member(job)
        zdel(before, m)
        zput(after, tonumber(job.created_at) or 0, m) -- 0: a hash changed by hand
    end
    if job.key then
        local keys = P .. 'keys'
        if TERMINAL[state] then
            if redis.call('HGET', keys, job.key) == job.id then
                redis.call('HDEL', keys, job.key)
            end
        else
            redis.call('HSETNX', keys, job.key, job.id)
        end
    end
    job.state = state
end

local waiting, handed, clock = nil, {}, nil

-- Start a call for the lane whose key prefix is `prefix`: every verb calls this first.
-- The helpers keep their state (buffered changes, the waiting workers read, the server's
-- time) in locals of this file, which live as long as the library of Redis functions
-- does (see redis_link.py): each call starts from scratch.
local function begin(prefix)
    P = prefix
    woke = false
    zsets, zorder, deltas, added = {}, {}, {}, {}
    tallies, tallied = {}, {}
    waiting, handed, clock = nil, {}, nil
end

-- The server's time, in seconds (the same for the whole script).
local function server_now()
    if not clock then
        local t = redis.call('TIME')
        clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
    end
    return clock
end

-- The first minute whose tallies are surely kept (a minute more than ENDS_KEPT asks, for
-- a key expiring while a script reads): stats reads the tallies of the minutes from then
-- on, and counts the older ones from the jobs.
local function tallies_kept_from()
    return (math.floor((server_now() + 60 - ENDS_KEPT) / 60) + 1) * 60
end

-- Count (sign 1) or uncount (sign -1) an ended job in the tallies of the minute it ended
-- in, from its state, finished_at, started_at and run_at as stored (strings or nil): a
-- job is counted while it is stored in an end state stats counts, so every verb that
-- ends one counts it, and delete, purge and retry uncount it with the same fields. Its
-- wait (started_at - run_at, when started_at is not before run_at) is counted in whole
-- microseconds, so that uncounting takes back exactly what counting added; a wait of
-- WAIT_US_MAX or more (due centuries before it ran: at= in year 1, a delay of -1e300) has
-- no exact count and is left out. A minute older than ENDS_KEPT has no tallies any more:
-- nothing is counted for it.
local WAIT_US_MAX = 2 ^ 53
local function tally(state, finished, started, run_at, sign)
    if not ENDED[state] or not finished then
        return
    end
    finished = tonumber(finished)
    if not finished then
        return
    end
    local minute = math.floor(finished / 60) * 60
    if minute + ENDS_KEPT <= server_now() then
        return
    end
    local t = tallies[minute]
    if not t then
        t = {succeeded = 0, failed = 0, cancelled = 0, wait_us = 0, waits = 0}
        tallies[minute] = t
        tallied[#tallied + 1] = minute
    end
    t[state] = t[state] + sign
    started, run_at = tonumber(started), tonumber(run_at) -- either may be changed by hand
    if started and run_at then
        local wait = started - run_at
        if wait >= 0 and wait * 1e6 < WAIT_US_MAX then
            t.wait_us = t.wait_us + sign * math.floor(wait * 1e6 + 0.5)
            t.waits = t.waits + sign
        end
    end
end

local TALLY_FIELDS = {'succeeded', 'failed', 'cancelled', 'wait_us', 'waits'}

-- Apply the buffered tallies: a minute left with no job loses its hash; a new one expires
-- ENDS_KEPT seconds after it starts. A minute still kept has its hash exactly while it is
-- in P ends, so a minute new to P ends is a new hash (and the time to drop lapsed ones).
flush_tallies = function()
    if #tallied == 0 then
        return
    end
    local index = P .. 'ends'
    for _, minute in ipairs(tallied) do
        local t = tallies[minute]
        local name = string.format('%.17g', minute)
        local key = P .. 'ends:' .. name
        local shrank = false
        for _, field in ipairs(TALLY_FIELDS) do
            if t[field] ~= 0 then -- as digits: Redis writes a large Lua number in e-notation
                redis.call('HINCRBY', key, field, string.format('%.0f', t[field]))
                shrank = shrank or t[field] < 0
            end
        end
        local left = 1
        if shrank then
            left = 0
            for _, n in ipairs(redis.call('HMGET', key, 'succeeded', 'failed', 'cancelled')) do
                left = left + (tonumber(n) or 0)
            end
        end
        if left <= 0 then
            redis.call('DEL', key)
            redis.call('ZREM', index, name)
        elseif redis.call('ZADD', index, minute, name) == 1 then
            redis.call('EXPIREAT', key, minute + ENDS_KEPT)
            redis.call('ZREMRANGEBYSCORE', index, '-inf', server_now() - ENDS_KEPT)
        end
    end
    tallies, tallied = {}, {}
end

-- The workers waiting in wait_for_work (read once per script; lapsed ones dropped).
local function waiters()
    if waiting then
        return waiting
    end
    waiting = {}
    local flat = redis.call('HGETALL', P .. 'waiting')
    for i = 1, #flat, 2 do
        local capacity, lease, deadline, queues = string.match(flat[i + 1],
            '^(%d+) (%S+) (%S+) ?(.*)$')
        if capacity and tonumber(deadline) >= server_now() then
            local w = {id = flat[i], capacity = tonumber(capacity), lease = tonumber(lease)}
            if queues ~= '' then
                w.queues = {}
                for _, q in ipairs(cjson.decode(queues)) do
                    w.queues[q] = true
                end
            end
            waiting[#waiting + 1] = w
        else
            redis.call('HDEL', P .. 'waiting', flat[i])
        end
    end
    return waiting
end

-- Whether a claimable job of `queue` at `priority` or above is due: a job handed to a
-- waiting worker must not pass it.
local function due_before(queue, priority)
    local floor = tonumber(priority) or 0
    for _, p in ipairs(redis.call('SMEMBERS', P .. 'prio:' .. queue)) do
        if (tonumber(p) or floor) >= floor then
            local key = P .. 'due:' .. queue .. ':' .. p
            if #redis.call('ZRANGEBYSCORE', key, '-inf', server_now(), 'LIMIT', 0, 1) > 0 then
                return true
            end
        end
    end
    return false
end

-- The waiting worker that may take claimable `job` (a table with its queue, priority and
-- run_at) now: one that takes its queue and has room, unless the job is not due, its queue
-- is paused, or a claimable job of its queue at its priority or above is due (it must not
-- pass that one). nil when there is none.
local function taker_for(job)
    local list = waiters()
    if #list == 0 or (tonumber(job.run_at) or 0) > server_now() then
        return nil
    end
    local taker
    for _, w in ipairs(list) do
        if w.capacity > 0 and (not w.queues or w.queues[job.queue]) then
            taker = w
            break
        end
    end
    if not taker or redis.call('SISMEMBER', P .. 'paused', job.queue) == 1
        or due_before(job.queue, job.priority) then
        return nil
    end
    return taker
end

-- Record that job <id>, now running for `taker` until `lease` (its short lease), goes to
-- it with the next hand-over: `flat` is its hash as HGETALL gives it.
local function handed_to(taker, id, lease, flat)
    zput(P .. 'run', lease, id)
    zput(P .. 'handed', lease, id)
    local batch = handed[taker]
    if not batch then
        batch = {}
        handed[taker] = batch
    end
    batch[#batch + 1] = flat
    taker.capacity = taker.capacity - 1
end

-- Hand a claimable job to a waiting worker that takes its queue, running for it as a
-- claim would make it; false when none may take it now.
local function hand_off(job)
    local taker = taker_for(job)
    if not taker then
        return false
    end
    local jk = jkey(job.id)
    local now = server_now()
    local lease = string.format('%.17g', now + taker.lease)
    local started = string.format('%.17g', now)
    local attempts = tonumber(redis.call('HGET', jk, 'attempts') or '0') + 1
    move(job, 'running')
    redis.call('HSET', jk, 'state', 'running', 'attempts', attempts, 'started_at', started,
               'lease_until', lease, 'worker_id', taker.id)
    handed_to(taker, job.id, lease, redis.call('HGETALL', jk))
    return true
end

-- Push each batch handed out to its worker, which stops waiting (one hand-off each).
hand_over = function()
    for taker, batch in pairs(handed) do
        local list = P .. 'hand:' .. taker.id
        redis.call('RPUSH', list, cjson.encode(batch))
        redis.call('PEXPIRE', list, 600000)
        redis.call('HDEL', P .. 'waiting', taker.id)
    end
    handed = {}
end

-- A queued job with nothing to wait for goes to a waiting worker, or into its queue's
-- claim order.
local function make_claimable(job)
    if job.state ~= 'queued' or job.after then
        return
    end
    if hand_off(job) then
        return
    end
    zput(due_key(job), tonumber(job.run_at) or 0, member(job))
    sadd_once(P .. 'prio:' .. job.queue, whole(job.priority) and job.priority or '0')
    woke = true
end

-- Clear `after` on the jobs that waited for <id> (it ended or is gone).
local function unblock(id)
    local wkey = P .. 'wait:' .. id
    for _, waiter_id in ipairs(redis.call('SMEMBERS', wkey)) do
        local waiter = load(waiter_id)
        if waiter and waiter.after == id then
            redis.call('HDEL', jkey(waiter_id), 'after')
            waiter.after = nil
            make_claimable(waiter)
        end
    end
    redis.call('DEL', wkey)
end

-- End a job that holds no lease (any lease already cleared from it and from P run).
local function end_job(job, state, now, keep_until)
    move(job, state)
    local jk = jkey(job.id)
    if keep_until and keep_until ~= '' then
        redis.call('HSET', jk, 'state', state, 'finished_at', now, 'keep_until', keep_until)
        zput(P .. 'kept', keep_until, job.id)
    else
        redis.call('HSET', jk, 'state', state, 'finished_at', now)
        redis.call('HDEL', jk, 'keep_until')
        zdel(P .. 'kept', job.id)
    end
    zput(P .. 'fin:' .. state, now, job.id)
    tally(state, now, job.started_at, job.run_at, 1)
    if job.waited then
        unblock(job.id)
    end
end

-- Queue again a running job (lease ended, or handed back), claimable at its old run_at.
local function requeue(job, attempts)
    zdel(P .. 'run', job.id)
    local jk = jkey(job.id)
    if attempts then
        redis.call('HSET', jk, 'state', 'queued', 'attempts', attempts)
    else
        redis.call('HSET', jk, 'state', 'queued')
    end
    redis.call('HDEL', jk, 'lease_until', 'worker_id')
    move(job, 'queued')
    make_claimable(job)
end

-- Whether <job> (running) was handed to a waiting worker that has not taken it: its lease
-- is still the short one it was handed with.
local function untaken(job)
    local until_ = redis.call('ZSCORE', P .. 'handed', job.id)
    return until_ and tonumber(until_) == tonumber(redis.call('HGET', jkey(job.id), 'lease_until'))
end

-- Queue again, the attempt uncounted, the jobs handed to a waiting worker that it did not
-- take before their short lease ended at `now` (it never said it started them), at most
-- `limit` of them; returns how many.
local function give_back_handed(now, limit)
    local gone = 0
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'handed', '-inf', '(' .. now,
                                   'LIMIT', 0, limit)) do
        local job = load(id)
        if job and job.state == 'running' and untaken(job) then
            requeue(job, math.max((tonumber(redis.call('HGET', jkey(id), 'attempts')) or 1) - 1, 0))
            gone = gone + 1
        end
        zdel(P .. 'handed', id)
    end
    return gone
end

-- A worker takes jobs handed to it while it waited (see hand_off): each of `ids` it still
-- holds gets `lease` (the worker's full lease) in place of the short one it was handed
-- with. Returns the ids among them that were given back before it took them (queued
-- again, or running for another worker): they may run twice. Changes are buffered.
local function take_jobs(worker, lease, ids, from)
    local lost = {}
    for i = from, #ids do
        local id = ids[i]
        local v = redis.call('HMGET', jkey(id), 'state', 'worker_id')
        if v[1] == 'running' and v[2] == worker then
            redis.call('HSET', jkey(id), 'lease_until', lease)
            zput(P .. 'run', lease, id)
            zdel(P .. 'handed', id)
        elseif v[1] == 'queued' or v[1] == 'running' then
            lost[#lost + 1] = id
        end
    end
    return lost
end

-- Remove a job and every trace of it; returns whether the caller must free the jobs
-- that waited for it (once all the removed jobs are gone).
local function remove(job)
    redis.call('DEL', jkey(job.id))
    local m = member(job)
    local state = job.state
    zdel(P .. 'all', m)
    count(state, job.queue, -1)
    if not (ACTIVE[state] or TERMINAL[state]) or not job.queue then
        -- changed by hand: it may be in any index but a queue's (no queue is known)
        zdel(P .. 'live', m)
        zdel(P .. 'run', job.id)
        zdel(P .. 'defer', job.id)
        zdel(P .. 'kept', job.id)
        for ended in pairs(TERMINAL) do
            zdel(P .. 'state:' .. ended, m)
            zdel(P .. 'fin:' .. ended, job.id)
        end
    elseif state == 'queued' then
        zdel(state_index(state), m)
        zdel(due_key(job), m)
    elseif state == 'running' then
        zdel(state_index(state), m)
        zdel(P .. 'run', job.id)
    elseif state == 'deferred' then
        zdel(state_index(state), m)
        zdel(P .. 'defer', job.id)
    else
        zdel(state_index(state), m)
        zdel(P .. 'kept', job.id)
        zdel(P .. 'fin:' .. state, job.id)
        tally(state, job.finished_at, job.started_at, job.run_at, -1)
    end
    if job.key and redis.call('HGET', P .. 'keys', job.key) == job.id then
        redis.call('HDEL', P .. 'keys', job.key)
    end
    if job.after then
        redis.call('SREM', P .. 'wait:' .. job.after, job.id)
    end
    return job.waited ~= nil
end

-- Store one job given as a table of string fields, with store order `seq` (and the
-- call's `token`, if given), unless an active job holds its key. `replaced` maps the ids of jobs not stored (key taken) to
-- the holder's id, so a later job of the same batch waits for the holder. Returns the
-- job's `after` as stored ('' for none), or the holder's fields.
local function insert(fields, replaced, seq, token)
    local after = fields.after
    if after then
        after = replaced[after] or after
    end
    local state = fields.state
    local active = ACTIVE[state]
    local key = fields.key
    if key and active then
        local holder = redis.call('HGET', P .. 'keys', key)
        if holder then
            replaced[fields.id] = holder
            return redis.call('HGETALL', jkey(holder))
        end
    end
    if after then
        local before = redis.call('HGET', jkey(after), 'state')
        if not before or not ACTIVE[before] then
            after = nil
        end
    end
    -- a job claimable at once goes straight to a waiting worker, if one may take it: stored
    -- running for it, in one write (see hand_off)
    local taker
    if state == 'queued' and not after then
        taker = taker_for(fields)
        if taker then
            local now = server_now()
            state = 'running'
            fields.state = state
            fields.attempts = tostring((tonumber(fields.attempts) or 0) + 1)
            fields.started_at = string.format('%.17g', now)
            fields.lease_until = string.format('%.17g', now + taker.lease)
            fields.worker_id = taker.id
        end
    end
    local args = {'seq', tostring(seq)}
    if token then
        args[3] = 'tok'
        args[4] = token
    end
    for name, value in pairs(fields) do
        if name ~= 'after' then
            args[#args + 1] = name
            args[#args + 1] = value
        end
    end
    local id = fields.id
    if after then
        args[#args + 1] = 'after'
        args[#args + 1] = after
        redis.call('SADD', P .. 'wait:' .. after, id)
        redis.call('HSET', jkey(after), 'waited', '1')
    end
    redis.call('HSET', jkey(id), unpack(args))
    local job = {id = id, seq = seq, state = state, queue = fields.queue,
                 priority = fields.priority, run_at = fields.run_at, after = after,
                 created_at = fields.created_at, key = key}
    local m = member(job)
    zput(P .. 'all', fields.created_at, m)
    zput(state_index(state), fields.created_at, m)
    count(state, job.queue, 1)
    sadd_once(P .. 'queues', job.queue)
    if key and active then
        redis.call('HSET', P .. 'keys', key, id)
    end
    if state == 'queued' then
        make_claimable(job)
    elseif taker then
        handed_to(taker, id, fields.lease_until, args)
    elseif state == 'running' then
        if fields.lease_until then
            zput(P .. 'run', fields.lease_until, id)
        end
    elseif state == 'deferred' then
        if fields.release_at then
            zput(P .. 'defer', fields.release_at, id)
        end
    else
        if fields.keep_until then
            zput(P .. 'kept', fields.keep_until, id)
        end
        if fields.finished_at then
            zput(P .. 'fin:' .. state, fields.finished_at, id)
            tally(state, fields.finished_at, fields.started_at, fields.run_at, 1)
        end
    end
    return after or ''
end

-- Refuse a batch naming an id twice, or an id already stored, unless it was stored by an
-- earlier run of this very call (one of its jobs carries the call's token): returns an
-- error reply, or nil and the set of ids that earlier run stored.
local function check_new(batch, token)
    local seen, stored = {}, {}
    local any = false
    for _, fields in ipairs(batch) do
        local id = fields.id
        if seen[id] then
            return redis.error_reply('BACKLANE enqueue refused: job id ' .. id .. ' is repeated')
        end
        seen[id] = true
        if redis.call('EXISTS', jkey(id)) == 1 then
            stored[id] = true
            any = true
        end
    end
    if any then
        local ours = false
        if token ~= '' then
            for id in pairs(stored) do
                if redis.call('HGET', jkey(id), 'tok') == token then
                    ours = true
                    break
                end
            end
        end
        if not ours then
            for id in pairs(stored) do
                return redis.error_reply(
                    'BACKLANE enqueue refused: job id ' .. id .. ' is already stored')
            end
        end
    end
    return nil, stored
end

-- Take up to `limit` claimable jobs for `worker`, in claim order: higher priority first,
-- then earlier run_at, then store order; queues paused are skipped. `queues` is a JSON
-- array of queue names ('' = every queue); `idle_ms` how long the idle mark lasts.
-- Returns {next_due, handed, <fields of job 1>, ...}: handed lists the fields of jobs
-- handed to the worker while it waited (see hand_off) that it may not have taken yet, now
-- taken: their lease is `lease` (the short one they were handed with ends); those beyond
-- `limit` are left to their short lease; each claimed job's fields are as they were before the claim (the caller
-- applies state, attempts + 1, started_at, lease_until, worker_id); next_due is the earliest run_at after now among the jobs left in those
-- queues ('' if none, or if the limit was reached). A worker that waits next gives
-- `handed_lease` and `offer` (seconds; else '' or nil): a claim that leaves it room then
-- offers that room to take work, as its wait would (see wait.lua). Changes are buffered:
-- flush() after.
-- What makes job <id>, found claimable as member `m` of the due set `entry` ({queue,
-- priority, key}), unfit for the scripts: a field they decide on changed by hand, said as
-- UnreadableJob says it; nil when nothing does.
local function spoiled_field(job, id, m, entry)
    local seq = job.seq
    if job.id == id and job.queue == entry[1] and job.priority == entry[2]
        and job.state == 'queued' and tonumber(job.run_at) and whole(seq)
        and tonumber(seq) == tonumber(string.sub(m, 1, 16)) then
        return nil -- as every job not changed by hand: no message to build
    end
    local expected = {
        {'id', id, "the job's id " .. id},
        {'seq', nil, 'its store order ' .. tonumber(string.sub(m, 1, 16))},
        {'queue', entry[1], "its queue's name " .. entry[1]},
        {'priority', entry[2], 'its priority ' .. entry[2]},
        {'state', 'queued', "'queued'"},
    }
    for _, e in ipairs(expected) do
        local name, value = e[1], job[e[1]]
        if value == nil then
            return "field '" .. name .. "' is missing"
        end
        local fits
        if name == 'seq' then
            fits = whole(value) and tonumber(value) == tonumber(string.sub(m, 1, 16))
        else
            fits = value == e[2]
        end
        if not fits then
            return "field '" .. name .. "' holds '" .. string.sub(value, 1, 80) .. "', not " .. e[3]
        end
    end
    if not tonumber(job.run_at) then
        return "field 'run_at' holds '" .. string.sub(job.run_at or '', 1, 80) .. "', not a number"
    end
    return nil
end

-- End failed, at `now`, a claimable job whose hash was changed by hand where the scripts
-- decide (`problem` says how): the fields that name its place in the indexes are written
-- back from them, the error says what was wrong, and it is kept until removed by hand.
local function fail_spoiled(job, problem, worker, now)
    local jk = jkey(job.id)
    if redis.call('EXISTS', jk) == 0 then
        return
    end
    redis.call('HSET', jk, 'id', job.id, 'queue', job.queue, 'priority', job.priority,
               'seq', tostring(tonumber(job.seq)), 'worker_id', worker, 'error', cjson.encode({
                   type = 'backlane.stores.redis_codec.UnreadableJob',
                   message = 'job ' .. job.id .. ': its hash in Redis cannot be read (' ..
                       problem .. '); mend that field or delete the job',
                   traceback = '',
               }))
    if not tonumber(job.run_at) then
        redis.call('HSET', jk, 'run_at', now)
        job.run_at = now
    end
    end_job(job, 'failed', now, nil)
end

local function claim_jobs(token, worker, now, lease, limit, queues, idle_ms, handed_lease,
                          offer)
    local last_claim = P .. 'claim:' .. worker
    local last = redis.call('GET', last_claim)
    if last and string.sub(last, 1, #token + 1) == token .. ' ' then
        -- sent again after a lost reply: the same jobs, as the first run returned them
        local saved = cjson.decode(string.sub(last, #token + 2))
        if type(saved[1]) ~= 'table' then
            saved = {saved, {}} -- written before handed jobs were kept too
        end
        local out, again = {''}, {}
        for _, id in ipairs(saved[2]) do
            local v = redis.call('HMGET', jkey(id), 'state', 'worker_id')
            if v[1] == 'running' and v[2] == worker then
                again[#again + 1] = redis.call('HGETALL', jkey(id))
            end
        end
        for _, id in ipairs(saved[1]) do
            local fields = redis.call('HGETALL', jkey(id))
            local job = {}
            for i = 1, #fields, 2 do
                job[fields[i]] = fields[i + 1]
            end
            if job.state == 'running' and job.worker_id == worker then
                -- undo what the claim changed, which the caller applies again
                for i = 1, #fields, 2 do
                    local name = fields[i]
                    if name == 'state' then
                        fields[i + 1] = 'queued'
                    elseif name == 'attempts' then
                        fields[i + 1] = tostring(tonumber(fields[i + 1]) - 1)
                    end
                end
                out[#out + 1] = fields
            end
        end
        table.insert(out, 2, again)
        return out
    end

    -- jobs handed to this worker while it waited that it has not taken (or has taken
    -- while this call was on its way: the caller drops those), as they are now
    redis.call('HDEL', P .. 'waiting', worker)
    local mine, batches, taken, kept = {}, {}, {}, {}
    local lists = {P .. 'hand:' .. worker, P .. 'took:' .. worker}
    if redis.call('EXISTS', lists[1], lists[2]) > 0 then
        for _, list in ipairs(lists) do
            for _, text in ipairs(redis.call('LRANGE', list, 0, -1)) do
                batches[#batches + 1] = cjson.decode(text)
            end
        end
        redis.call('DEL', lists[1], lists[2])
    end
    for _, w in ipairs(waiting or {}) do
        if w.id == worker then
            w.capacity = 0
            if handed[w] then
                batches[#batches + 1] = handed[w]
                handed[w] = nil
            end
        end
    end
    for _, batch in ipairs(batches) do
        for _, fields in ipairs(batch) do
            local id
            for i = 1, #fields, 2 do
                if fields[i] == 'id' then
                    id = fields[i + 1]
                end
            end
            local v = redis.call('HMGET', jkey(id), 'state', 'worker_id')
            if v[1] == 'running' and v[2] == worker and not taken[id] and #mine < limit then
                -- (beyond the limit, left as they are: the worker may have started one
                -- already, its take on the way; the others come back uncounted)
                taken[id] = true
                redis.call('HSET', jkey(id), 'lease_until', lease)
                zput(P .. 'run', lease, id)
                zdel(P .. 'handed', id)
                mine[#mine + 1] = redis.call('HGETALL', jkey(id))
                kept[#kept + 1] = id
            end
        end
    end
    limit = limit - #mine
    give_back_handed(server_now(), 100)

    local names
    if queues == '' then
        names = redis.call('SMEMBERS', P .. 'queues')
    else
        names = cjson.decode(queues)
    end
    local paused = {}
    for _, queue in ipairs(redis.call('SMEMBERS', P .. 'paused')) do
        paused[queue] = true
    end
    local levels, priorities, seen = {}, {}, {}
    for _, queue in ipairs(names) do
        if not paused[queue] and not seen[queue] then
            seen[queue] = true
            for _, priority in ipairs(redis.call('SMEMBERS', P .. 'prio:' .. queue)) do
                local p = tonumber(priority) or 0
                if not levels[p] then
                    levels[p] = {}
                    priorities[#priorities + 1] = p
                end
                local level = levels[p]
                level[#level + 1] = {queue, priority, P .. 'due:' .. queue .. ':' .. priority}
            end
        end
    end
    table.sort(priorities, function(a, b) return a > b end)

    local function earlier(a, b)
        if a[2] ~= b[2] then
            return a[2] < b[2]
        end
        return a[1] < b[1]
    end

    local out = {''}
    local ids = {}
    local remaining = limit
    for _, p in ipairs(priorities) do
        if remaining <= 0 then
            break
        end
        local level = levels[p]
        local candidates = {}
        for _, entry in ipairs(level) do
            local key = entry[3]
            local found = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, remaining)
            for i = 1, #found, 2 do
                candidates[#candidates + 1] = {found[i], tonumber(found[i + 1]), entry}
            end
        end
        if #level > 1 then
            table.sort(candidates, earlier)
        end
        local taken = {}
        for i = 1, math.min(remaining, #candidates) do
            local m, entry = candidates[i][1], candidates[i][3]
            local gone = taken[entry]
            if not gone then
                gone = {}
                taken[entry] = gone
            end
            gone[#gone + 1] = m
            local id = string.sub(m, 17)
            local jk = jkey(id)
            local fields = redis.call('HGETALL', jk)
            local job = {}
            for f = 1, #fields, 2 do
                job[fields[f]] = fields[f + 1]
            end
            local spoiled = spoiled_field(job, id, m, entry)
            -- what the scripts decide on, from where the claim found the job
            job.id, job.seq, job.queue, job.priority = id, string.sub(m, 1, 16), entry[1], entry[2]
            job.state = 'queued'
            if spoiled then
                fail_spoiled(job, spoiled, worker, now)
            elseif #fields > 0 then
                move(job, 'running')
                redis.call('HSET', jk, 'state', 'running', 'attempts', (tonumber(job.attempts) or 0) + 1,
                           'started_at', now, 'lease_until', lease, 'worker_id', worker)
                zput(P .. 'run', lease, id)
                ids[#ids + 1] = id
                out[#out + 1] = fields
                remaining = remaining - 1
            end
        end
        for entry, gone in pairs(taken) do
            for i = 1, #gone, 1000 do
                redis.call('ZREM', entry[3], unpack(gone, i, math.min(i + 999, #gone)))
            end
        end
        for _, entry in ipairs(level) do
            -- a job made claimable earlier in this script is still in the buffer: its
            -- priority must stay listed, or no claim would look at it
            if redis.call('EXISTS', entry[3]) == 0 and not buffered(entry[3]) then
                redis.call('SREM', P .. 'prio:' .. entry[1], entry[2])
            end
        end
    end

    if remaining > 0 then
        local next_due
        for _, p in ipairs(priorities) do
            for _, entry in ipairs(levels[p]) do
                local later = redis.call('ZRANGEBYSCORE', entry[3], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
                if #later > 0 and (not next_due or tonumber(later[2]) < tonumber(next_due)) then
                    next_due = later[2]
                end
            end
        end
        out[1] = next_due or ''
    end
    if remaining > 0 then
        -- took all there was: the worker may wait now, so work made claimable is announced
        redis.call('SET', P .. 'idle', '1', 'PX', idle_ms)
        if offer and offer ~= '' then
            local deadline = string.format('%.17g', server_now() + tonumber(offer) + 0.1)
            redis.call('HSET', P .. 'waiting', worker,
                       remaining .. ' ' .. handed_lease .. ' ' .. deadline .. ' ' .. queues)
        end
    end
    if #ids > 0 or #kept > 0 then
        local saved = cjson.encode({ids, kept})
        redis.call('SET', last_claim, token .. ' ' .. saved, 'EX', 120)
    end
    table.insert(out, 2, mine)
    return out
end

-- Record how attempts ended (`text`: JSON array of outcomes {id, worker_id, state,
-- finished_at, result?, error?, run_at?, keep_until?, attempt?}, string values), for the
-- jobs their worker still holds; an outcome's `attempt` (a JSON object, as text) is
-- appended to the job's `history` (a JSON array, as text). Returns the ids applied.
-- Changes are buffered: flush() after.
local function finish_outcomes(text)
    local applied = {}
    for _, o in ipairs(cjson.decode(text)) do
        local id = o.id
        local jk = jkey(id)
        local v = redis.call('HMGET', jk, 'state', 'worker_id', 'queue', 'priority', 'seq',
                             'created_at', 'run_at', 'key', 'waited', 'started_at')
        if v[1] == 'running' and v[2] == o.worker_id then
            local job = {id = id, state = v[1], queue = v[3], priority = v[4], seq = v[5],
                         created_at = v[6], run_at = v[7], key = v[8] or nil}
            zdel(P .. 'run', id)
            local set, unset = {}, {'lease_until'}
            if o.result then
                set[#set + 1] = 'result'
                set[#set + 1] = o.result
            else
                unset[#unset + 1] = 'result'
            end
            if o.error then
                set[#set + 1] = 'error'
                set[#set + 1] = o.error
            else
                unset[#unset + 1] = 'error'
            end
            if o.attempt then
                local history = redis.call('HGET', jk, 'history')
                if history and #history > 2 then
                    history = string.sub(history, 1, -2) .. ',' .. o.attempt .. ']'
                else
                    history = '[' .. o.attempt .. ']'
                end
                set[#set + 1] = 'history'
                set[#set + 1] = history
            end
            local state = o.state
            move(job, state)
            if state == 'queued' then
                unset[#unset + 1] = 'worker_id'
                if o.run_at then
                    set[#set + 1] = 'run_at'
                    set[#set + 1] = o.run_at
                    job.run_at = o.run_at
                end
                redis.call('HSET', jk, 'state', 'queued', unpack(set))
                redis.call('HDEL', jk, unpack(unset))
                make_claimable(job)
            else
                local keep = o.keep_until
                if keep then
                    set[#set + 1] = 'keep_until'
                    set[#set + 1] = keep
                    zput(P .. 'kept', keep, id)
                else
                    unset[#unset + 1] = 'keep_until'
                end
                redis.call('HSET', jk, 'state', state, 'finished_at', o.finished_at, unpack(set))
                redis.call('HDEL', jk, unpack(unset))
                zput(P .. 'fin:' .. state, o.finished_at, id)
                tally(state, o.finished_at, v[10], v[7], 1)
                if v[9] then
                    unblock(id)
                end
            end
            applied[#applied + 1] = id
        end
    end
    return applied
end
