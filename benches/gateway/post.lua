-- wrk script of the gateway bench: POSTs the echo call the bench's own generator
-- sends, and counts answers that are not a 200 carrying the echoed result. done()
-- prints one line of key=value pairs that benches/gateway/wrk.rs reads.

wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"echo","params":["hello"]}'
wrk.headers["Content-Type"] = "application/json"

-- Each wrk thread runs its own Lua state: these are per thread, summed in done()
-- through the thread handles setup() collected.
non200 = 0
wrong = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  elseif not string.find(body, '"result":["hello"]', 1, true) then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local bad_status, bad_body = 0, 0
  for _, thread in ipairs(threads) do
    bad_status = bad_status + thread:get("non200")
    bad_body = bad_body + thread:get("wrong")
  end
  local e = summary.errors
  io.write(string.format(
    "rpcgate-bench-wrk requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d" ..
    " non200=%d wrong=%d p50=%d p90=%d p99=%d p999=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    bad_status, bad_body,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
