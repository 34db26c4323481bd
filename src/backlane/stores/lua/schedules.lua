-- schedules: every known schedule's latest slot ('' for none), and the paused ones.
-- Returns {{name, slot, name, slot, ...}, {paused names}}.
return {redis.call('HGETALL', P .. 'sched'), redis.call('SMEMBERS', P .. 'sched:paused')}
