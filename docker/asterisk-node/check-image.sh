#!/bin/bash
# Run once while the node image is built, after the packages and asterisk-conf/ are in place.
# It fails the build instead of leaving a node that boots with modules silently missing.
set -euo pipefail
export LC_ALL=C

ETC=${ASTERISK_ETC:-/etc/asterisk}

fail() {
    printf 'check-image: %s\n' "$*" >&2
    exit 1
}

id asterisk >/dev/null 2>&1 || fail "the asterisk package did not create the asterisk user"
command -v setpriv >/dev/null || fail "setpriv (util-linux) is missing"

# asterisk.conf names the Debian amd64 module directory; on another architecture point that
# path at the package's own directory.
moddir=$(sed -n 's/^astmoddir[[:space:]]*=>[[:space:]]*//p' "$ETC/asterisk.conf")
[[ -n $moddir ]] || fail "astmoddir not set in $ETC/asterisk.conf"
real=$(dpkg -L asterisk-modules | awk '/\/asterisk\/modules\/chan_pjsip\.so$/ && !n++')
real=${real%/*}
[[ -d $real ]] || fail "asterisk-modules ships no chan_pjsip.so"
if [[ ! -d $moddir ]]; then
    mkdir -p "$(dirname "$moddir")"
    ln -s "$real" "$moddir"
    echo "check-image: $moddir -> $real"
fi

# Every module modules.conf loads must exist in the installed packages.
modules=$(awk '{
    sub(/;.*/, "")
    i = index($0, "=")
    if (!i) next
    key = substr($0, 1, i - 1); value = substr($0, i + 1)
    gsub(/^[ \t]+|[ \t]+$/, "", key)
    if (key != "load") next
    sub(/^>+/, "", value); gsub(/^[ \t]+|[ \t]+$/, "", value)
    print value
}' "$ETC/modules.conf")
[[ -n $modules ]] || fail "modules.conf loads no module"
missing=()
for module in $modules; do
    [[ -f $moddir/$module ]] || missing+=("$module")
done
(( ${#missing[@]} == 0 )) || fail "modules listed in modules.conf are not installed: ${missing[*]}"

grep -Eq '^icesupport[[:space:]]*=[[:space:]]*no[[:space:]]*$' "$ETC/rtp.conf" \
    || fail "rtp.conf must keep icesupport = no"

# The modules asterisk-patches/ changes must be the rebuilt ones, Debian's kept aside.
built=/usr/share/asterisk-node/modules/modules
[[ -s $built ]] || fail "no list of rebuilt modules ($built)"
while read -r name path; do
    dpkg-divert --list "$path" | grep -q -- "$path.debian" \
        || fail "$name is Debian's as shipped, not the build of asterisk-patches/"
    cmp -s "$path" "$path.debian" && fail "$name is identical to Debian's"
done < "$built"

count=$(wc -w <<<"$modules")
echo "check-image: $(asterisk -V), all $count modules of modules.conf installed"
