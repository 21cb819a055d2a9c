-- wrk script for make bench. IDEM_MODE selects the request:
--   fresh:  POST with a new Idempotency-Key every request (never seen before)
--   replay: POST with one fixed key (IDEM_KEY), completed before the run
--   get:    GET without a key (a request the filter does not protect)
--   nokey:  POST without a key (the filter runs, finds no key, lets it pass)
-- IDEM_BODY is the request body size in bytes.
local mode = os.getenv("IDEM_MODE") or "fresh"
local size = tonumber(os.getenv("IDEM_BODY") or "1024")
local fixed_key = os.getenv("IDEM_KEY") or "bench-replay"
local body = string.rep("x", size)
local counter = 0
-- Keys must differ across runs and wrk threads, not only within one.
local prefix = string.format("%x-%x-", os.time(), math.random(0, 0x7fffffff))

function setup(thread)
  thread:set("tid", tostring(math.random(0, 0x7fffffff)))
end

function init(args)
  math.randomseed(os.time() + (tonumber(tid) or 0))
  prefix = string.format("%x-%s-", os.time(), tid or "0")
end

function request()
  if mode == "get" then
    return wrk.format("GET", "/orders", {}, nil)
  end
  if mode == "nokey" then
    return wrk.format("POST", "/payments", {["Content-Type"] = "application/json"}, body)
  end
  local key = fixed_key
  if mode == "fresh" then
    counter = counter + 1
    key = prefix .. counter
  end
  return wrk.format("POST", "/payments", {
    ["Idempotency-Key"] = key,
    ["Content-Type"] = "application/json",
  }, body)
end
