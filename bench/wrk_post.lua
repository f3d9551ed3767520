-- wrk script for bench/run: POSTs the JSON body in the file $WRK_BODY and, when done,
-- prints one line "WRKJSON {...}" with throughput inputs, latency percentiles and errors.
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
-- $WRK_CONTENT_TYPE overrides the type ("" sends none, as tritonclient does);
-- $WRK_HEADER_LENGTH sets OIP's Inference-Header-Content-Length (binary tensor data).
local ct = os.getenv("WRK_CONTENT_TYPE")
if ct == nil then ct = "application/json" end
if ct ~= "" then wrk.headers["Content-Type"] = ct end
local hl = os.getenv("WRK_HEADER_LENGTH")
if hl ~= nil and hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
