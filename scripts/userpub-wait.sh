#!/bin/sh
# userpub-wait.sh: `userpub wait` for job wrappers without Python (POSIX sh, dash, busybox).
#
#   userpub-wait.sh CID --repos R1,R2,... [--timeout S] [--interval S]
#                   [--mount-root /cvmfs] [--prefix sw] [-q]
#
# Each round checks <mount-root>/<repo>/<prefix>/<CID> in every repository; the first that
# is a directory is printed on stdout (exit 0). Exit codes: 0 found, 1 bad CID,
# 2 usage error, 7 timed out (the message names every path checked).
# Defaults: --repos $USERPUB_REPOS, --timeout 1200, --interval 15 (whole seconds).

prog=userpub-wait
cid=""
repos="${USERPUB_REPOS:-}"
timeout=1200
interval=15
mount_root=/cvmfs
prefix=sw
quiet=0

usage() {
    echo "usage: $prog CID --repos R1,R2,... [--timeout S] [--interval S] [--mount-root DIR] [--prefix sw] [-q]" >&2
    exit 2
}
say() { [ "$quiet" = 1 ] || echo "$prog: $*" >&2; }
is_count() { case "$1" in ''|*[!0-9]*) return 1;; *) return 0;; esac; }
now() { date +%s 2>/dev/null || echo ""; }

while [ $# -gt 0 ]; do
    case "$1" in
        --repos) [ $# -ge 2 ] || usage; repos="$2"; shift 2 ;;
        --repos=*) repos="${1#*=}"; shift ;;
        --timeout) [ $# -ge 2 ] || usage; timeout="$2"; shift 2 ;;
        --timeout=*) timeout="${1#*=}"; shift ;;
        --interval) [ $# -ge 2 ] || usage; interval="$2"; shift 2 ;;
        --interval=*) interval="${1#*=}"; shift ;;
        --mount-root) [ $# -ge 2 ] || usage; mount_root="$2"; shift 2 ;;
        --mount-root=*) mount_root="${1#*=}"; shift ;;
        --prefix) [ $# -ge 2 ] || usage; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        -q|--quiet) quiet=1; shift ;;
        -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        --) shift; [ $# -eq 1 ] && [ -z "$cid" ] || usage; cid="$1"; shift ;;
        -*) echo "$prog: unknown option $1" >&2; usage ;;
        *) [ -z "$cid" ] || usage; cid="$1"; shift ;;
    esac
done

[ -n "$cid" ] || usage
is_count "$timeout" || { echo "$prog: --timeout needs whole seconds" >&2; usage; }
is_count "$interval" && [ "$interval" -gt 0 ] || { echo "$prog: --interval needs whole seconds > 0" >&2; usage; }
repos=$(printf '%s' "$repos" | tr ',' ' ')
[ -n "$(printf '%s' "$repos" | tr -d ' ')" ] || { echo "$prog: give --repos R1,R2,... (or set USERPUB_REPOS)" >&2; usage; }

# The CID rules that matter for a path: relative, no '.'-leading or empty parts, at most one '/'.
case "$cid" in
    /*|.*|*/.*|*//*|*/|*/*/*|*"'"*|*'\'*|*' '*)
        echo "$prog: invalid CID: $cid" >&2; exit 1 ;;
esac

paths=""
for repo in $repos; do
    if [ -n "$prefix" ]; then p="$mount_root/$repo/$prefix/$cid"; else p="$mount_root/$repo/$cid"; fi
    paths="${paths:+$paths, }$p"
done

start=$(now)
elapsed=0
rounds=0
last_report=0
while :; do
    rounds=$((rounds + 1))
    for repo in $repos; do
        if [ -n "$prefix" ]; then p="$mount_root/$repo/$prefix/$cid"; else p="$mount_root/$repo/$cid"; fi
        if [ -d "$p" ]; then
            printf '%s\n' "$p"
            exit 0
        fi
    done
    # Elapsed time from the clock when `date +%s` works, else from the sleeps made so far.
    t=$(now)
    if is_count "$start" && is_count "$t"; then elapsed=$((t - start)); fi
    if [ "$rounds" = 1 ]; then
        say "waiting up to $timeout s for $cid in: $paths"
    elif [ $((elapsed - last_report)) -ge 60 ]; then
        last_report=$elapsed
        say "still waiting for $cid ($elapsed s)"
    fi
    if [ "$elapsed" -ge "$timeout" ]; then
        echo "$prog: error: timeout: $cid did not appear within $timeout s ($rounds checks, every $interval s) in any of: $paths" >&2
        exit 7
    fi
    nap=$((timeout - elapsed))
    [ "$nap" -le "$interval" ] || nap=$interval
    sleep "$nap"
    if ! is_count "$start"; then elapsed=$((elapsed + nap)); fi
done
