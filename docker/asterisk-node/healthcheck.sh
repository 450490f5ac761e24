#!/bin/bash
# HEALTHCHECK of the Asterisk node image: healthy once Asterisk has fully booted and every
# module that modules.conf loads is running. With autoload=no a module whose dependency is
# missing declines silently (chan_pjsip does so without res_pjsip_pubsub), so "fully booted"
# alone is not enough; the sandbox makes the same check at start.
set -euo pipefail
export LC_ALL=C

ETC=${ASTERISK_ETC:-/etc/asterisk}
ASTERISK_BIN=${ASTERISK_BIN:-/usr/sbin/asterisk}

# `asterisk -rx` exits 0 on an unknown command: look for the answer itself.
booted=$(timeout 8 "$ASTERISK_BIN" -rx "core waitfullybooted" 2>&1) || {
    printf 'not reachable: %s\n' "$booted"
    exit 1
}
if [[ $booted != *"fully booted"* ]]; then
    printf 'not fully booted: %s\n' "$booted"
    exit 1
fi

# The modules listed with `load =` (or `load =>`), comments stripped, in file order.
wanted=$(awk '{
    sub(/;.*/, "")
    i = index($0, "=")
    if (!i) next
    key = substr($0, 1, i - 1); value = substr($0, i + 1)
    gsub(/^[ \t]+|[ \t]+$/, "", key)
    if (key != "load") next
    sub(/^>+/, "", value); gsub(/^[ \t]+|[ \t]+$/, "", value)
    print value
}' "$ETC/modules.conf")

# A module that declined is still listed, as "Not Running".
shown=$(timeout 8 "$ASTERISK_BIN" -rx "module show" 2>&1) || {
    printf 'module show failed: %s\n' "$shown"
    exit 1
}
declare -A running=()
while read -r module; do
    [[ -z $module ]] || running[$module]=1
done <<<"$(awk '/[ \t][0-9]+[ \t]+Running[ \t]+[^ \t]+[ \t]*$/ { print $1 }' <<<"$shown")"
missing=()
for module in $wanted; do
    [[ -n ${running[$module]:-} ]] || missing+=("$module")
done
if (( ${#missing[@]} )); then
    printf 'modules listed in modules.conf are not running: %s\n' "${missing[*]}"
    exit 1
fi
echo "fully booted, $(grep -c . <<<"$wanted") modules running"
