-- delete: remove jobs whatever their state; the jobs waiting for them are freed.
-- ARGV: ids... Returns how many were removed.
local removed, waited = 0, {}
for i = 1, #ARGV do
    local job = load(ARGV[i], true)
    if job then
        if remove(job) then
            waited[#waited + 1] = job.id
        end
        removed = removed + 1
    end
end
for _, id in ipairs(waited) do
    unblock(id)
end
flush()
return removed
