#!/bin/sh
# `make system-deps`: install the Debian packages some tests use, explicitly, saying which.
# Without them those tests skip with the reason (`make test` works anyway). As root it installs
# what is missing and keeps the packages' own services from starting (the tests run nginx,
# squid and prometheus themselves, on 127.0.0.1, with their own configurations); as any other
# user, or on a system without apt, it installs nothing and says what to run instead.
set -eu
packages="$*"
services="nginx squid prometheus haproxy"   # packages whose Debian postinst starts a daemon

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no dpkg/apt-get here (not Debian): install the equivalents of:" \
         "$packages (the tests that need them skip until then)" >&2
    exit 1
fi
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "system-deps: every Debian package the tests use is installed:" $packages
    exit 0
fi
echo "system-deps: missing Debian packages:$missing"
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: run as root: sudo make system-deps (it runs: apt-get install" \
         "--no-install-recommends$missing, and keeps their services from starting);" \
         "until then the tests that need them skip" >&2
    exit 1
fi
echo "system-deps: installing:$missing (their services are not started or enabled: the tests" \
     "run their own instances on 127.0.0.1)"
# Debian starts a package's service when it is installed (nginx on :80, squid on :3128):
# policy-rc.d answering 101 forbids that, for invoke-rc.d and deb-systemd-invoke alike.
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by cvmfs-userpub make system-deps while installing\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=yes
fi
install_missing() {  # $1: extra apt-get options
    # shellcheck disable=SC2086
    apt-get $1 update -qq && DEBIAN_FRONTEND=noninteractive apt-get $1 install -y -qq \
        --no-install-recommends $missing >/dev/null
}
status=0
install_missing "" || {
    # In some containers apt's unprivileged download user (_apt) cannot resolve or reach the
    # mirror; root can: try once more without the sandbox user.
    echo "system-deps: apt-get failed; retrying without apt's sandbox user (_apt)" >&2
    status=0
    install_missing "-o APT::Sandbox::User=root" || status=$?
}
if [ -n "$made_policy" ]; then rm -f "$policy"; fi
[ "$status" -eq 0 ] || { echo "system-deps: apt-get failed ($status)" >&2; exit "$status"; }
for s in $services; do
    case " $missing " in *" $s "*) ;; *) continue ;; esac
    if [ -d /run/systemd/system ]; then
        systemctl disable --now "$s" >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d "$s" disable >/dev/null 2>&1 || true
    fi
done
echo "system-deps: installed:$missing"
