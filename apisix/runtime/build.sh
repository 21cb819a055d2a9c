#!/usr/bin/env bash
# Builds APISIX's Wasm runtime from sources: api7/wasm-nginx-module 0.7.0 as a
# dynamic module of Debian's nginx 1.22.1, on the wasmtime 0.38.1 C API, with
# Debian's ngx_lua for the Lua side. This is the code that talks to a filter in
# APISIX (wasm-nginx-module's C and Lua, resty.http, wasmtime 0.38.1); what
# differs from a packaged APISIX is said in the README's APISIX section.
#
# Output (a no-op when it is already built from the same script and lockfile):
#   $CACHE/nginx-modules/ngx_http_wasm_module.so  the module, rpath to lib/
#   $CACHE/wasmtime/lib/libwasmtime.so           wasmtime 0.38.1's C API
#   $CACHE/lua/                                  resty.proxy-wasm, resty.http
#   $CACHE/stamp                                 what it was built from
#
# Sources: $APISIX_RUNTIME_SOURCES (the offline snapshots of the pinned refs,
# default ../shared/apisix-runtime/sources when that exists), or else the same
# refs cloned from GitHub.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
CACHE=${APISIX_RUNTIME_CACHE:-$repo/.cache/apisix-runtime}
SOURCES=${APISIX_RUNTIME_SOURCES:-}
if [ -z "$SOURCES" ] && [ -d "$repo/../shared/apisix-runtime/sources" ]; then
    SOURCES=$repo/../shared/apisix-runtime/sources
fi

# The pinned refs (the same ones the offline snapshots hold).
WASM_NGINX_MODULE_REF=0.7.0
WASMTIME_REF=v0.38.1
LUA_NGINX_MODULE_REF=v0.10.23
WASM_C_API_REF=c9d31284651b975f05ac27cee0bab1377560b87e
LUA_RESTY_HTTP_REF=3a3203a855e45ecc06f5c556cc34bc7f1a3ea0a3

APT_PACKAGES="build-essential nginx nginx-dev libnginx-mod-http-lua libnginx-mod-http-ndk
  libnginx-mod-http-ndk-dev libluajit2-5.1-dev lua-resty-core lua-resty-lrucache lua-cjson"

# What the build depends on: this script, the lockfile, and nginx's version
# (none yet on a fresh machine: dpkg-query fails, which must not end the script).
build_stamp() {
    { cat "$here/build.sh" "$here/wasmtime-c-api.Cargo.lock"; dpkg-query -W nginx 2>/dev/null || true; } \
        | sha256sum | cut -c1-16
}
stamp=$(build_stamp)
if [ -f "$CACHE/stamp" ] && [ "$(cat "$CACHE/stamp")" = "$stamp" ] \
    && [ -f "$CACHE/nginx-modules/ngx_http_wasm_module.so" ]; then
    exit 0
fi

log() { printf 'apisix-runtime: %s\n' "$*"; }

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    log "installing Debian packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    stamp=$(build_stamp)
fi

work=$CACHE/build
rm -rf "$work" && mkdir -p "$work/src"
cd "$work/src"

# unpack NAME TARBALL-PREFIX REPO REF [SPARSE-PATH]: a snapshot when there is
# one, else a shallow clone of the same ref.
unpack() {
    local name=$1 prefix=$2 url=$3 ref=$4 sparse=${5:-}
    local tarball
    tarball=$(ls "$SOURCES"/"$prefix"*.tar.gz 2>/dev/null | head -n 1 || true)
    if [ -n "$tarball" ]; then
        mkdir -p "$name" && tar xzf "$tarball" -C "$name" --strip-components=1
        return
    fi
    log "cloning $url at $ref"
    git init -q "$name"
    git -C "$name" fetch -q --depth 1 --filter=blob:none "$url" "$ref"
    if [ -n "$sparse" ]; then git -C "$name" sparse-checkout set $sparse; fi
    git -C "$name" checkout -q FETCH_HEAD
}
unpack wasm-nginx-module wasm-nginx-module- https://github.com/api7/wasm-nginx-module "$WASM_NGINX_MODULE_REF"
unpack lua-nginx-module lua-nginx-module- https://github.com/openresty/lua-nginx-module "$LUA_NGINX_MODULE_REF" src/api
unpack lua-resty-http api7-lua-resty-http- https://github.com/api7/lua-resty-http "$LUA_RESTY_HTTP_REF" lib

# --- wasmtime 0.38.1's C API -------------------------------------------------
# Kept across module rebuilds: it takes minutes, the module seconds.
wasmtime_stamp=$(cat "$here/build.sh" "$here/wasmtime-c-api.Cargo.lock" | sha256sum | cut -c1-16)
if [ "$(cat "$CACHE/wasmtime/stamp" 2>/dev/null)" != "$wasmtime_stamp" ]; then
# Its sources are needed only here (a module-only rebuild takes none of them).
unpack wasmtime wasmtime- https://github.com/bytecodealliance/wasmtime "$WASMTIME_REF" crates/c-api
unpack wasm-c-api wasm-c-api- https://github.com/WebAssembly/wasm-c-api "$WASM_C_API_REF" include
# crates.io has no wasmtime-c-api 0.38, so crates/c-api of the tag is built as
# its own workspace, its path dependencies replaced by the crates.io releases of
# the same version, pinned by our lockfile (without it cargo picks cranelift
# 0.85.3). cap-primitives 0.24.3 calls `file.set_times(..)` meaning the
# fs-set-times trait; since Rust 1.75 std's inherent File::set_times wins and
# the call no longer compiles, so a copy calls the trait method explicitly.
capi=$work/wasmtime-c-api
cp -r "$work/src/wasmtime/crates/c-api" "$capi"
rm -rf "$capi/wasm-c-api" && mkdir -p "$capi/wasm-c-api"
cp -r "$work/src/wasm-c-api/include" "$capi/wasm-c-api/include"
sed -i \
    -e 's|^wasmtime = { path = "../wasmtime",|wasmtime = { version = "=0.38.1",|' \
    -e 's|^wasi-cap-std-sync = { path = "../wasi-common/cap-std-sync",|wasi-cap-std-sync = { version = "=0.38.1",|' \
    -e 's|^wasmtime-wasi = { path = "../wasi",|wasmtime-wasi = { version = "=0.38.1",|' \
    "$capi/Cargo.toml"
cat >>"$capi/Cargo.toml" <<'EOF'

[workspace]

[patch.crates-io]
cap-primitives = { path = "../cap-primitives" }

[profile.release]
debug = false

# wasmtime-runtime 0.38 writes the VM context (a memory's current length after
# memory.grow, among others) through pointers derived from `&self`. Today's
# rustc tells LLVM that `&self` is read-only, and LLVM drops such stores: the
# guest then grows its memory, its allocator hands out addresses past what
# memory.size and the host see, and filters trap or fail on bodies of a few
# hundred bytes. wasmtime's 2022 release build (what apisix-runtime ships) had
# no such optimisation; this crate built without it behaves the same.
[profile.release.package.wasmtime-runtime]
opt-level = 0
EOF
cp "$here/wasmtime-c-api.Cargo.lock" "$capi/Cargo.lock"

# The crate's source comes through cargo itself (a throwaway package that
# depends on it), then is copied and mended.
fetcher=$work/cap-primitives-fetch
mkdir -p "$fetcher/src" && touch "$fetcher/src/lib.rs"
printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncap-primitives = "=0.24.3"\n' >"$fetcher/Cargo.toml"
(cd "$fetcher" && cargo fetch -q)
registry_copy=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cap-primitives-0.24.3 | head -n 1)
cp -r "$registry_copy" "$work/cap-primitives"
for f in src/rustix/fs/set_times_impl.rs src/rustix/linux/fs/set_times_impl.rs; do
    sed -i 's|return file.set_times(|return SetTimes::set_times(\&file, |' "$work/cap-primitives/$f"
done

log "building wasmtime 0.38.1's C API (about 3 minutes on 2 cores)"
(cd "$capi" && RUSTFLAGS="--cap-lints allow" CARGO_TARGET_DIR="$CACHE/cargo-target" cargo build -q --release --locked)
rm -rf "$CACHE/wasmtime" && mkdir -p "$CACHE/wasmtime/lib"
cp -r "$capi/include" "$CACHE/wasmtime/include"
cp "$capi/wasm-c-api/include/"*.h "$CACHE/wasmtime/include/"
cp "$CACHE/cargo-target/release/libwasmtime.so" "$CACHE/wasmtime/lib/"
# A library whose memory.grow is not seen would break every filter with a
# body of more than a few hundred bytes: refuse it here, not in a test.
gcc -O1 -o "$work/memory_grow_check" "$here/memory_grow_check.c" -I"$CACHE/wasmtime/include" \
    -L"$CACHE/wasmtime/lib" -lwasmtime -Wl,-rpath,"$CACHE/wasmtime/lib"
"$work/memory_grow_check"
echo "$wasmtime_stamp" >"$CACHE/wasmtime/stamp"
fi

# --- wasm-nginx-module as a dynamic module of Debian's nginx -----------------
# The module's config expects wasmtime-c-api/{include,lib} beside it (the
# layout of wasmtime's release tarball).
mod=$work/src/wasm-nginx-module
ln -s "$CACHE/wasmtime" "$mod/wasmtime-c-api"

ngx=$work/nginx
cp -r /usr/share/nginx/src "$ngx"
# conf_flags holds the exact ./configure flags of Debian's nginx binary, which a
# dynamic module must match (--with-compat).
# shellcheck disable=SC1091
. "$ngx/conf_flags"
log "building wasm-nginx-module $WASM_NGINX_MODULE_REF for nginx $(dpkg-query -W -f='${Version}' nginx)"
(
    cd "$ngx"
    ./configure "${NGX_CONF_FLAGS[@]}" --add-dynamic-module="$mod" \
        --with-cc-opt="-g -O2 -fPIC -I$work/src/lua-nginx-module/src/api -I/usr/include/luajit-2.1" \
        --with-ld-opt="-Wl,-rpath,$CACHE/wasmtime/lib" >/dev/null
    make -s -f objs/Makefile modules >/dev/null
)
mkdir -p "$CACHE/nginx-modules" "$CACHE/lua/resty"
cp "$ngx/objs/ngx_http_wasm_module.so" "$CACHE/nginx-modules/"
cp "$mod/lib/resty/proxy-wasm.lua" "$CACHE/lua/resty/"
cp -r "$work/src/lua-resty-http/lib/resty/." "$CACHE/lua/resty/"

rm -rf "$work"
echo "$stamp" >"$CACHE/stamp"
log "built into $CACHE"
