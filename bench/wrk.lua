-- wrk script for the Haboob benchmark (see bench/wrk.py).
--
-- done() prints one line "HBWRK {json}" with the summary, the latency
-- percentiles (microseconds) and the error counts. When HB_WRK_CHECK is set
-- in the environment, response() also checks every response: status 200 and
-- a body of exactly the expected length (the first script argument). wrk
-- decides once, from the main script state, whether to collect bodies, so
-- response() is defined only in the checking pass: defining it slows wrk
-- down, which is why the timed pass runs without it.

local threads = {}
local checking = os.getenv("HB_WRK_CHECK") ~= nil

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   expected = tonumber(args[1]) or -1
   ok, bad_status, bad_length = 0, 0, 0
end

if checking then
   function response(status, headers, body)
      if status ~= 200 then
         bad_status = bad_status + 1
      elseif #body ~= expected then
         bad_length = bad_length + 1
      else
         ok = ok + 1
      end
   end
end

function done(summary, latency, requests)
   local c = {ok = 0, bad_status = 0, bad_length = 0}
   for _, t in ipairs(threads) do
      for k, _ in pairs(c) do
         c[k] = c[k] + (t:get(k) or 0)
      end
   end
   local e = summary.errors
   local p = {}
   for _, q in ipairs({50, 75, 90, 99, 99.9}) do
      table.insert(p, string.format('"%s": %d', tostring(q), latency:percentile(q)))
   end
   io.write(string.format(
      'HBWRK {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"min": %d, "mean": %.1f, "stdev": %.1f, "max": %d, "percentiles": {%s}}, ' ..
      '"checked": %s, "check": {"ok": %d, "bad_status": %d, "bad_length": %d}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max, table.concat(p, ", "),
      tostring(checking), c.ok, c.bad_status, c.bad_length))
end
