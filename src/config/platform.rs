//! The proxy the filter runs in, described by what it can do: the filter
//! asks these questions, never which proxy it is.

/// Which proxy runs the filter. Chosen by configuration, not detected:
/// detecting APISIX would mean probing calls it answers UNIMPLEMENTED. The
/// filter asks a platform what it can do, never which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Envoy,
    /// Apache APISIX (wasm-nginx-module): no shared data, no tick, HTTP calls
    /// only in request phases, the body only when asked for.
    Apisix,
    /// Testing aid: runs in Envoy, behaves exactly as on APISIX, and traps
    /// on any call APISIX would not allow, so that a test fails.
    ApisixProfile,
}

impl Platform {
    /// APISIX's rules apply (on APISIX itself or in its profile on Envoy).
    fn apisix_rules(self) -> bool {
        matches!(self, Platform::Apisix | Platform::ApisixProfile)
    }

    /// The body callback comes only if the filter asks for it (APISIX:
    /// the `wasm_process_req_body` property).
    pub fn solicits_body(self) -> bool {
        self.apisix_rules()
    }

    /// The end of stream given with the request headers means "no body".
    /// APISIX signals it even when a body follows (it reads the body only if
    /// asked); in Envoy, the APISIX profile included, it is the truth.
    pub fn headers_end_of_stream_is_final(self) -> bool {
        self != Platform::Apisix
    }

    /// Waiting for the body means pausing the request. APISIX calls the
    /// body callback because the property is set, and a pause there with
    /// nothing pending would stall its driver.
    pub fn pauses_for_body(self) -> bool {
        self != Platform::Apisix
    }

    /// HTTP calls are allowed only while the request is handled, one at a
    /// time (so store calls are chained within the request, and the
    /// response phases cannot reach the store).
    pub fn calls_only_in_request_phases(self) -> bool {
        self.apisix_rules()
    }

    /// A refusal that follows a cancel waits for the cancel's answer (calls
    /// cannot outlive the request's handling). Elsewhere the cancel runs on
    /// its own and the refusal goes out at once.
    pub fn answers_after_cancel(self) -> bool {
        self.apisix_rules()
    }

    /// Outbound calls can be owned by the worker (the VM's root context)
    /// rather than by the request that makes them, so that an answer is
    /// still handled after its request has gone (Envoy). APISIX runs calls
    /// only within the request.
    pub fn calls_outlive_streams(self) -> bool {
        self == Platform::Envoy
    }

    /// The host's router marks a call answer that an upstream sent
    /// (`x-envoy-upstream-service-time`), so its own replies can be told
    /// apart (Envoy).
    pub fn marks_upstream_call_answers(self) -> bool {
        self == Platform::Envoy
    }

    /// The filter's own calls go through Envoy's router, whose `x-envoy-*`
    /// request headers (retries, timeouts, alternative answers) a client
    /// must not be able to set on them.
    pub fn calls_go_through_envoys_router(self) -> bool {
        self == Platform::Envoy
    }

    /// The root context gets a periodic tick (Envoy): the claims of running
    /// requests are renewed on it. APISIX has none.
    pub fn has_tick(self) -> bool {
        self == Platform::Envoy
    }

    /// Proxy shared data exists (the local store, the replay cache).
    pub fn has_shared_data(self) -> bool {
        !self.apisix_rules()
    }

    /// Properties land in filter state that access logs can read.
    pub fn has_filter_state(self) -> bool {
        !self.apisix_rules()
    }

    /// HTTP calls name an address (`host:port`), not one of the proxy's
    /// clusters (APISIX).
    pub fn calls_addresses(self) -> bool {
        self == Platform::Apisix
    }

    /// Listing the request's headers needs a `Host` header (APISIX: see
    /// `HostError::no_host`); Envoy always has `:authority`. (The APISIX
    /// profile runs in Envoy, which refuses HTTP/1.0 requests by default.)
    pub fn lists_headers_only_with_host(self) -> bool {
        self == Platform::Apisix
    }

    /// Testing aid: every host call is checked against APISIX's rules, and
    /// a violation traps.
    pub fn checks_apisix_rules(self) -> bool {
        self == Platform::ApisixProfile
    }
}
