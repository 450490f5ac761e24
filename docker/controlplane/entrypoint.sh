#!/bin/sh
# Entrypoint of the control plane image. The image runs against an external PostgreSQL:
# without PBX_DSN, pbxctl would start the embedded PostgreSQL, which is for development.
set -eu

refuse() {
    printf 'pbx-controlplane: %s\n' "$*" >&2
    exit 64
}

if [ "${1:-}" = pbxctl ]; then
    case "${2:-}" in
        serve | migrate | agent | render)
            [ -n "${PBX_DSN:-}" ] || refuse "PBX_DSN must be set, e.g." \
                "postgresql://pbx:PASSWORD@postgres:5432/pbx (the embedded PostgreSQL is" \
                "for development and is not used in this image)"
            case $PBX_DSN in
                *REPLACE_ME*) refuse "PBX_DSN still holds the placeholder password of" \
                    "docker/.env.example: set a real POSTGRES_PASSWORD" ;;
            esac
            ;;
        up | sandbox | db)
            refuse "'pbxctl $2' runs the embedded PostgreSQL or sandboxed Asterisk nodes," \
                "which are for development: use 'pbxctl serve' with PBX_DSN, and the node image"
            ;;
    esac
fi
exec "$@"
