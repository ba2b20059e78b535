#!/bin/bash
# kvferry-bench's two-host mode on one machine: prefill and decode in two
# network namespaces joined by a veth pair (10.77.0.1 <-> 10.77.0.2), over
# UCX's tcp transport, as two hosts without RDMA would run. Needs root (ip
# netns). The namespaces and the veth pair are removed on exit.
#
#   bench/two_namespaces.sh [path/to/kvferry-bench] [extra kvferry-bench flags...]
#
# Both processes get the same flags (the layout must match); prefill listens
# on 10.77.0.1, decode connects to it. Leaving loopback needs a shared
# secret (KVFERRY_SECRET), which both sides read from the environment.
set -euo pipefail

BENCH=${1:-build/release/bench/kvferry-bench}
shift || true
NS_PREFILL=kvf-bench-prefill
NS_DECODE=kvf-bench-decode
PORT=18515
CONTROL_PORT=18516

cleanup() {
  ip netns del "$NS_PREFILL" 2>/dev/null || true
  ip netns del "$NS_DECODE" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip netns add "$NS_PREFILL"
ip netns add "$NS_DECODE"
ip link add kvf-prefill type veth peer name kvf-decode
ip link set kvf-prefill netns "$NS_PREFILL"
ip link set kvf-decode netns "$NS_DECODE"
ip -n "$NS_PREFILL" addr add 10.77.0.1/24 dev kvf-prefill
ip -n "$NS_DECODE" addr add 10.77.0.2/24 dev kvf-decode
for ns in "$NS_PREFILL" "$NS_DECODE"; do
  ip -n "$ns" link set lo up
done
ip -n "$NS_PREFILL" link set kvf-prefill up
ip -n "$NS_DECODE" link set kvf-decode up

export KVFERRY_SECRET=${KVFERRY_SECRET:-two-namespaces-demo-secret}
# Over veth, UCX's only transport is tcp (the same host's shared memory is
# still reachable from both namespaces; tcp is forced to stand in for two
# hosts). UCX_NET_DEVICES names the veth in each namespace.
COMMON=(--tls=tcp --progress_seconds=0 "$@")

echo "# prefill in $NS_PREFILL (10.77.0.1), decode in $NS_DECODE (10.77.0.2)"
ip netns exec "$NS_PREFILL" env UCX_NET_DEVICES=kvf-prefill "$BENCH" --role=prefill \
  --listen=10.77.0.1 --port=$PORT --control_port=$CONTROL_PORT "${COMMON[@]}" &
PREFILL=$!
ip netns exec "$NS_DECODE" env UCX_NET_DEVICES=kvf-decode "$BENCH" --role=decode \
  --peer=10.77.0.1:$PORT --control_port=$CONTROL_PORT "${COMMON[@]}"
DECODE_RC=$?
wait $PREFILL
PREFILL_RC=$?
echo "# decode exit $DECODE_RC, prefill exit $PREFILL_RC"
exit $(( DECODE_RC || PREFILL_RC ))
