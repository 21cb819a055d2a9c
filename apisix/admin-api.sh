#!/usr/bin/env bash
# The routes of apisix.yaml through the Admin API: APISIX in traditional mode
# with etcd (config-traditional.yaml). Usage:
#   ADMIN=http://127.0.0.1:9180 KEY=<deployment.admin.admin_key[0].key> ./admin-api.sh
# The configurations are the same as apisix.yaml's (a test holds them equal),
# and those run on APISIX's Wasm runtime in the tests.
set -euo pipefail
ADMIN=${ADMIN:-http://127.0.0.1:9180}
KEY=${KEY:?set KEY to the admin API key (deployment.admin.admin_key in config.yaml)}

curl -fsS -X PUT "$ADMIN/apisix/admin/routes/payments" -H "X-API-KEY: $KEY" -d '{
  "uri": "/payments*",
  "plugins": {
    "idempotency": {
      "conf": {
        "host": "apisix",
        "required": true,
        "store": {"type": "redis", "cluster": "webdis:7379", "timeout_ms": 500, "on_unavailable": "reject"},
        "forward": {"upstream": "payments:8081", "timeout_ms": 8000}
      }
    }
  },
  "upstream": {"type": "roundrobin", "nodes": {"payments:8081": 1}}
}'

curl -fsS -X PUT "$ADMIN/apisix/admin/routes/orders" -H "X-API-KEY: $KEY" -d '{
  "uri": "/orders*",
  "plugins": {
    "idempotency": {
      "conf": {
        "host": "apisix",
        "generate_missing": true,
        "store": {"type": "redis", "cluster": "webdis:7379", "key_prefix": "idem-orders:", "on_unavailable": "allow"},
        "forward": {"upstream": "payments:8081"}
      }
    }
  },
  "upstream": {"type": "roundrobin", "nodes": {"payments:8081": 1}}
}'
echo
