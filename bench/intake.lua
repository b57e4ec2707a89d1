-- wrk script of bench/intake.py: replays pre-signed raw HTTP requests, each sent at most once.
--
-- Arguments (after wrk's "--"): <file> <threads>. The file holds records "<length>\n<raw request>";
-- thread k of n sends records k, k+n, k+2n, ... When a thread runs out it sends GET /healthz
-- fillers and counts them, so bench/intake.py can tell a too-small request set from a result.
-- "GET:/path" instead of a file sends that GET forever (the baseline).
-- done() prints one line "BENCH_JSON {...}" with the summary and latency percentiles (microseconds).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path, nthreads = args[1], tonumber(args[2])
  reqs = {}
  issued = 0
  exhausted = 0
  filler = wrk.format("GET", "/healthz")
  if string.sub(path, 1, 4) == "GET:" then
    fixed = wrk.format("GET", string.sub(path, 5))
    return
  end
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  local pos, i = 1, 0
  while pos <= #data do
    local nl = string.find(data, "\n", pos, true)
    local len = tonumber(string.sub(data, pos, nl - 1))
    if i % nthreads == tid then
      reqs[#reqs + 1] = string.sub(data, nl + 1, nl + len)
    end
    i = i + 1
    pos = nl + 1 + len
  end
end

function request()
  if fixed then
    issued = issued + 1
    return fixed
  end
  if issued < #reqs then
    issued = issued + 1
    return reqs[issued]
  end
  exhausted = exhausted + 1
  return filler
end

function done(summary, latency, requests)
  local issued_total, exhausted_total = 0, 0
  for _, t in ipairs(threads) do
    issued_total = issued_total + t:get("issued")
    exhausted_total = exhausted_total + t:get("exhausted")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"completed":%d,"duration_us":%d,"bytes":%d,"issued":%d,"exhausted":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes, issued_total, exhausted_total,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
