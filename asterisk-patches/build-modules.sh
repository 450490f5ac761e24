#!/bin/sh
# Build the Asterisk modules that asterisk-patches/ changes (res_pjsip.so, res_sorcery_astdb.so,
# res_pjsip_refer.so)
# for the Asterisk installed on this Debian system, from Debian's own source package of exactly
# that version, with the patches in this directory applied.
#
#   build-modules.sh PATCH_DIR OUT_DIR [WORK_DIR]
#
# Run as root on a Debian system (sid) where the asterisk package is installed and apt works;
# it installs the build tools and asterisk-dev itself. OUT_DIR receives each module (stripped),
# modules (one "file path" line per module: where the package installs it), asterisk-version
# and patch-id. The sandbox runs it in a throw-away copy of its Asterisk root;
# docker/asterisk-node/Dockerfile runs it in a build stage. The modules are built with Debian's
# compiler flags and configure options, checked against the installed package's build-option
# checksum (Asterisk refuses modules built with other options) and compiled with the package's
# own autoconfig.h.
set -eu

patch_dir=$(cd "${1:?patch directory}" && pwd)
out=${2:?output directory}
work=${3:-/build/asterisk-modules}
# The modules the patches touch (res/<name>.so in Asterisk's tree).
modules="res_pjsip res_sorcery_astdb res_pjsip_refer"

say() { printf '[build-modules] %s\n' "$*"; }
apt_get() { apt-get -o Acquire::Check-Valid-Until=false "$@"; }

version=$(dpkg-query -W -f='${Version}' asterisk)
module_path() { dpkg -S "*/asterisk/modules/$1.so" | sed -n 's/^[^:]*: //p' | head -n1; }
for module in $modules; do
    [ -n "$(module_path "$module")" ] || {
        say "the installed asterisk packages have no $module.so"; exit 1; }
done
say "asterisk $version, modules: $modules"

# Enable source packages for every Debian archive apt already uses.
for list in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$list" ] || continue
    if ! grep -q '^deb-src ' "$list"; then
        sed -n 's/^deb \(.*\)$/deb-src \1/p' "$list" > "$list.src"
        cat "$list.src" >> "$list" && rm -f "$list.src"
    fi
done
for sources in /etc/apt/sources.list.d/*.sources; do
    [ -f "$sources" ] || continue
    sed -i 's/^Types: deb$/Types: deb deb-src/' "$sources"
done

export DEBIAN_FRONTEND=noninteractive
apt_get update -q
# What Asterisk's configure needs, what the bundled pjproject's configure needs (OpenSSL: it
# decides pjsip's struct layouts), and asterisk-dev for the package's own headers.
apt_get install -y -q --no-install-recommends \
    dpkg-dev gcc g++ make patch pkg-config bzip2 xz-utils binutils libc6-dev \
    libssl-dev libjansson-dev libxml2-dev libxslt1-dev uuid-dev libedit-dev libsqlite3-dev \
    libsrtp2-dev libcurl4-openssl-dev "asterisk-dev=$version"

rm -rf "$work" && mkdir -p "$work" && cd "$work"
say "fetching the source of asterisk $version"
apt_get source -q --only-source "asterisk=$version"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'asterisk-*' | head -n1)
[ -n "$src" ] || { say "apt-get source left no asterisk-* directory"; exit 1; }
cd "$src"

for p in "$patch_dir"/*.patch; do
    say "applying $(basename "$p")"
    patch -p1 --forward --quiet < "$p"
done

# As debian/rules does: the bundled pjproject is built from the package's Xpjproject component.
pj_major=$(sed -n 's/^export PJ_VERSION_MAJOR *:= *\([0-9]*\).*/\1/p' Xpjproject/version.mak)
pj_minor=$(sed -n 's/^export PJ_VERSION_MINOR *:= *\([0-9]*\).*/\1/p' Xpjproject/version.mak)
pj_rev=$(sed -n 's/^export PJ_VERSION_REV *:= *\([0-9]*\).*/\1/p' Xpjproject/version.mak)
pj_version=$pj_major.$pj_minor${pj_rev:+.$pj_rev}
pj_dir=$src/debian/build-pjproject
mkdir -p "$pj_dir"
ln -sfn ../../Xpjproject "$pj_dir/pjproject-$pj_version"
(cd "$pj_dir" && tar --create "pjproject-$pj_version"/* | bzip2 --fast > "pjproject-$pj_version.tar.bz2")
(cd "$pj_dir" && md5sum "pjproject-$pj_version.tar.bz2") \
    > "third-party/pjproject/pjproject-$pj_version.tar.bz2.md5"

# Debian's flags (debian/rules: hardening=+all, -O3 -fno-partial-inlining instead of -O2).
export DEB_BUILD_MAINT_OPTIONS=hardening=+all
export DEB_CFLAGS_MAINT_STRIP=-O2
export DEB_CFLAGS_MAINT_APPEND="-O3 -fno-partial-inlining"
CFLAGS="$(dpkg-buildflags --get CFLAGS) $(dpkg-buildflags --get CPPFLAGS)"
LDFLAGS="$(dpkg-buildflags --get LDFLAGS) -Wl,--as-needed"
export CFLAGS LDFLAGS
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)

say "configuring (with the bundled pjproject $pj_version)"
chmod 755 debian/dummyprogs/fetch
TMPDIR=$pj_dir PATH=$PATH:$src/debian/dummyprogs ./configure -q \
    --build="$(dpkg-architecture -qDEB_BUILD_GNU_TYPE)" --prefix=/usr \
    --includedir=/usr/include --mandir=/usr/share/man --infodir=/usr/share/info \
    --sysconfdir=/etc --localstatedir=/var --disable-option-checking --disable-silent-rules \
    --libdir="/usr/lib/$multiarch" --runstatedir=/run --disable-maintainer-mode \
    --disable-dependency-tracking --disable-asteriskssl --with-gsm --without-pwlib --without-sdl

make -s menuselect.makeopts >/dev/null
for option in app_voicemail_odbc res_config_mysql chan_mobile chan_ooh323 \
        codec_opus_open_source aelparse format_mp3 smsq TEST_FRAMEWORK; do
    menuselect/menuselect --enable "$option" menuselect.makeopts >/dev/null 2>&1 || true
done
menuselect/menuselect --disable BUILD_NATIVE menuselect.makeopts >/dev/null 2>&1 || true
make -s include/asterisk/buildopts.h >/dev/null 2>&1

sum_of() { sed -n 's/^#define AST_BUILDOPT_SUM "\(.*\)"/\1/p' "$1"; }
ours=$(sum_of include/asterisk/buildopts.h)
theirs=$(sum_of /usr/include/asterisk/buildopts.h)
if [ -z "$ours" ] || [ "$ours" != "$theirs" ]; then
    say "build options differ from the package's ($ours, package $theirs): Asterisk would refuse the module"
    exit 1
fi
# Feature macros exactly as the package was built (libraries this build lacks included).
cp /usr/include/asterisk/autoconfig.h include/asterisk/autoconfig.h

targets=$(for module in $modules; do printf '%s.so ' "$module"; done)
say "building $targets"
# A make rule, written literally: $(...) are make variables.
# shellcheck disable=SC2016
printf 'pbx-modules: makeopts\n\t+@_ASTCFLAGS="$(MOD_SUBDIR_CFLAGS) $(_ASTCFLAGS)" ASTCFLAGS="$(ASTCFLAGS)" _ASTLDFLAGS="$(_ASTLDFLAGS)" ASTLDFLAGS="$(ASTLDFLAGS)" $(SUBMAKE) --no-builtin-rules -C res SUBDIR=res $(PBX_MODULES)\n' \
    > pbx-modules.mk
make -f Makefile -f pbx-modules.mk pbx-modules PBX_MODULES="$targets" -j"$(nproc)" \
    AST_FORTIFY_SOURCE= DEBUG= OPTIMIZE= NOISY_BUILD=yes \
    ASTDATADIR=/usr/share/asterisk ASTVARRUNDIR=/var/run/asterisk

mkdir -p "$out"
: > "$out/modules"
for module in $modules; do
    path=$(module_path "$module")
    # Each module must link against exactly what the package's module links against.
    installed=$(dpkg-divert --truename "$path")
    for kind in --defined-only --undefined-only; do
        nm -D "$kind" "$installed" | awk '{print $NF}' | sort > "$work/symbols.package"
        nm -D "$kind" "res/$module.so" | awk '{print $NF}' | sort > "$work/symbols.built"
        if ! cmp -s "$work/symbols.package" "$work/symbols.built"; then
            say "$module.so: dynamic symbols ($kind) differ from the package's:"
            diff "$work/symbols.package" "$work/symbols.built" | head -n 20
            exit 1
        fi
    done
    strip --strip-unneeded -o "$out/$module.so" "res/$module.so"
    printf '%s.so %s\n' "$module" "$path" >> "$out/modules"
done
printf '%s\n' "$version" > "$out/asterisk-version"
cat "$patch_dir"/*.patch | sha256sum | cut -c1-16 > "$out/patch-id"
say "done: $targets in $out (patches $(cat "$out/patch-id"))"
