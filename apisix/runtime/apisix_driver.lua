-- Drives a proxy-wasm filter through wasm-nginx-module's `resty.proxy-wasm`
-- exactly as APISIX's `apisix/wasm.lua` does (read at apache/apisix f519a0f):
--
--   init_worker      wasm.load(name, file)                 once per worker (one VM each)
--   access           on_configure(plugin, conf JSON)       once per route configuration,
--                                                          at its first request, then cached
--                    on_http_request_headers(ctx)
--                    body: only if the filter set $wasm_process_req_body, the whole
--                    body read, then on_http_request_body(ctx, body, true)
--   header_filter    on_http_response_headers(ctx); remembers $wasm_process_resp_body
--   body_filter      on_http_response_body(ctx), only when it was asked for
--
-- A status >= 100 from the filter ends the request inside resty.proxy-wasm
-- (ngx.exit); a failure there is a 503, as in APISIX. What stands in for APISIX
-- here is only its router and plugin chain: a route is a URI prefix with a `conf`.
local wasm = require("resty.proxy-wasm")
local cjson = require("cjson.safe")

local _M = {}

local plugin            -- this worker's loaded module
local plugin_name = "idempotency"
local routes = {}       -- { {id=, prefix=, conf_json=, ctx=} }, longest prefix first

local function log_err(...)
    ngx.log(ngx.ERR, plugin_name, ": ", ...)
end

-- routes_file: JSON {"routes": [{"id": "r1", "prefix": "/", "conf": {...} or "..."}]}
function _M.init_worker(wasm_file, routes_file)
    local f = assert(io.open(routes_file))
    local doc = assert(cjson.decode(f:read("*a")))
    f:close()
    for _, r in ipairs(doc.routes) do
        -- APISIX JSON-encodes a table `conf`, and passes a string as it is.
        local conf = r.conf
        if type(conf) == "table" then
            conf = cjson.encode(conf)
        end
        routes[#routes + 1] = { id = r.id, prefix = r.prefix, conf_json = conf }
    end
    table.sort(routes, function(a, b) return #a.prefix > #b.prefix end)

    local err
    plugin, err = wasm.load(plugin_name, wasm_file)
    if not plugin then
        ngx.log(ngx.EMERG, "failed to load ", wasm_file, ": ", err)
    end
end

local function match(uri)
    for _, r in ipairs(routes) do
        if uri:sub(1, #r.prefix) == r.prefix then
            return r
        end
    end
end

-- APISIX's fetch_plugin_ctx: on_configure at the route's first request.
local function plugin_ctx(route)
    if not route.ctx then
        local ctx, err = wasm.on_configure(plugin, route.conf_json)
        if not ctx then
            return nil, err
        end
        route.ctx = ctx
    end
    return route.ctx
end

function _M.access()
    local route = match(ngx.var.uri)
    if not route then
        return ngx.exit(404)
    end
    ngx.ctx.route = route
    if not plugin then
        return ngx.exit(503)
    end
    local ctx, err = plugin_ctx(route)
    if not ctx then
        log_err("failed to fetch wasm plugin ctx: ", err)
        return ngx.exit(503)
    end

    local ok
    ok, err = wasm.on_http_request_headers(ctx)
    if not ok then
        log_err("failed to run wasm plugin: ", err)
        return ngx.exit(503)
    end

    if ngx.var.wasm_process_req_body ~= "" then
        ngx.var.wasm_process_req_body = ""
        -- core.request.get_body: the buffered body, or the temp file nginx
        -- spilled it to.
        ngx.req.read_body()
        local body = ngx.req.get_body_data()
        if not body then
            local file = ngx.req.get_body_file()
            if file then
                local fh = io.open(file, "rb")
                if fh then
                    body = fh:read("*a")
                    fh:close()
                end
            end
        end
        ok, err = wasm.on_http_request_body(ctx, body, true)
        if not ok then
            log_err("failed to run wasm plugin: ", err)
            return ngx.exit(503)
        end
    end
end

function _M.header_filter()
    local route = ngx.ctx.route
    if not route or not route.ctx then
        return
    end
    local ok, err = wasm.on_http_response_headers(route.ctx)
    if not ok then
        log_err("failed to run wasm plugin: ", err)
        return ngx.exit(503)
    end
    if ngx.var.wasm_process_resp_body ~= "" then
        ngx.var.wasm_process_resp_body = ""
        ngx.ctx.process_resp_body = true
    end
end

function _M.body_filter()
    local route = ngx.ctx.route
    if not ngx.ctx.process_resp_body or not route or not route.ctx then
        return
    end
    local ok, err = wasm.on_http_response_body(route.ctx)
    if not ok then
        log_err("failed to run wasm plugin: ", err)
    end
end

return _M
