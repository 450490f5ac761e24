-- wrk script for bench/api_load.py.
--
-- Arguments (after `--` on the wrk command line):
--   get                          plain requests to the URL given to wrk (static, cheapest)
--   create TENANT_ID NUMBER_BASE POST /api/v1/extensions with a unique number per request
--   bulk COUNT                   POST the bulk create at the URL given to wrk (a fresh
--                                tenant's), COUNT extensions per request, numbers unique
--
-- The Authorization header comes from `-H` on the command line. `done()` prints one line
-- starting with WRKJSON that bench/api_load.py parses: exact percentiles from wrk's
-- histogram (microseconds) and the error counters; `status` counts responses >= 400.

local counter = 0
local tenant_id = 0
local base = 0
local count = 0
local thread_no = 0
local threads = {}

function setup(thread)
   thread:set("bench_thread_no", #threads)
   table.insert(threads, thread)
end

local function create_request()
   counter = counter + 1
   -- Each thread owns a block of 100,000 numbers; the base gives every run its own blocks.
   local number = base + thread_no * 100000 + counter
   local body = string.format('{"tenant_id": %d, "number": "%d"}', tenant_id, number)
   return wrk.format("POST", "/api/v1/extensions", nil, body)
end

-- Numbers of 8 digits from 10000000 on; requests of all threads interleave (up to 64
-- threads), so no two requests of a run ask for the same number.
local function bulk_request()
   counter = counter + 1
   local first = 10000000 + ((counter - 1) * 64 + thread_no) * count
   local body = string.format('{"first_number": "%d", "count": %d}', first, count)
   return wrk.format("POST", nil, nil, body)
end

function init(args)
   local mode = args[1] or "get"
   thread_no = bench_thread_no or 0
   if mode == "create" then
      tenant_id = tonumber(args[2])
      base = tonumber(args[3])
      wrk.headers["Content-Type"] = "application/json"
      request = create_request
   elseif mode == "bulk" then
      count = tonumber(args[2])
      wrk.headers["Content-Type"] = "application/json"
      request = bulk_request
   elseif mode ~= "get" then
      error("unknown mode " .. mode)
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d, "mean_us": %.1f, "p50_us": %d, '
      .. '"p90_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
