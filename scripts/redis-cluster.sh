#!/usr/bin/env bash
# Start or stop the three-master Redis Cluster (127.0.0.1:7000-7002) that the
# cluster tests use. The tests reuse a healthy cluster and never stop one
# they did not start, so CI starts it here and stops it when it is done.
set -euo pipefail
dir=/tmp/oncely-ci-redis-cluster
ports=(7000 7001 7002)

case "${1:-}" in
  start)
    if redis-cli -p 7000 cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
      echo "redis-cluster: already healthy on ${ports[*]}"; exit 0
    fi
    mkdir -p "$dir"
    for p in "${ports[@]}"; do
      redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
      rm -f "$dir/nodes-$p.conf"
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "$dir/nodes-$p.conf" \
        --save '' --appendonly no --daemonize yes --dir "$dir" --logfile "$dir/$p.log"
    done
    for p in "${ports[@]}"; do
      for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    redis-cli --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 1 100); do
      ok=1
      for p in "${ports[@]}"; do redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0; done
      [ "$ok" = 1 ] && { echo "redis-cluster: up on ${ports[*]}"; exit 0; }
      sleep 0.2
    done
    echo "redis-cluster: did not become healthy" >&2; exit 1
    ;;
  stop)
    for p in "${ports[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
    rm -rf "$dir"
    echo "redis-cluster: stopped"
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
