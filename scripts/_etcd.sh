# Sourced by scripts/test: make sure an `etcd` binary is there for the broker-group tests
# (issue 10). As root (CI is) and without etcd on PATH, install Debian's etcd-server with apt;
# otherwise do nothing. Never fails the run: offline or without apt, print one line and go on,
# and the group tests skip saying etcd is missing.
_sharedmem_ensure_etcd() {
    if command -v etcd >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
        return 0
    fi
    echo "sharedmem: installing etcd-server with apt for the broker-group tests" >&2
    # policy-rc.d exit 101: the package must not start a system etcd on :2379 (the tests
    # start their own members on free ports); removed again right after.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends etcd-server; } >/dev/null 2>&1; then
        echo "sharedmem: could not install etcd-server (offline?); the group tests will skip" >&2
    fi
    if [ "$made_policy" = 1 ]; then
        rm -f "$policy"
    fi
    return 0
}
_sharedmem_ensure_etcd
