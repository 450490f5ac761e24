#!/bin/bash
# Register (or update) an Asterisk node of docker/compose.yaml with the control plane:
# POST /api/v1/nodes, or PATCH /api/v1/nodes/{id} when a node of that name exists.
#
#   docker/register-node.sh node1        # reads docker/.env, like docker compose
#   ENV_FILE=/path/to/.env docker/register-node.sh node2
#
# The node's AMI/ARI credentials are the ones its container got (NODEn_AMI_USER,
# NODEn_AMI_SECRET, NODEn_ARI_USER, NODEn_ARI_PASSWORD); sip_address is NODEn_EXTERNAL_ADDRESS;
# ami_host is the service name (nodeN) and ari_url http://nodeN:8088 on the compose network.
# Variables set in the environment take precedence over the env file, as in docker compose.
#
# The request is made from inside the controlplane container: the operator's first-start API
# credentials only work from loopback, and they are read there from
# $PBX_DATA_DIR/credentials.json. The secrets travel on stdin, never on a command line. The
# API stores them and never returns them.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
node=${1:-}
env_file=${ENV_FILE:-$here/.env}
compose=(docker compose -f "$here/compose.yaml")
[[ -f $env_file ]] && compose+=(--env-file "$env_file")

die() {
    printf 'register-node: %s\n' "$*" >&2
    exit 64
}

[[ $node =~ ^node[0-9]+$ ]] || die "usage: $0 nodeN (a node service of compose.yaml)"
prefix=${node^^}

# KEY=value lines of the env file (no shell evaluation); optional surrounding quotes.
declare -A file_values=()
if [[ -f $env_file ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
        key=${BASH_REMATCH[2]}
        value=${BASH_REMATCH[3]}
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        fi
        file_values[$key]=$value
    done <"$env_file"
fi

# Each setting from the environment, else from the env file; all required.
declare -A settings=()
missing=()
for suffix in EXTERNAL_ADDRESS AMI_USER AMI_SECRET ARI_USER ARI_PASSWORD; do
    name=${prefix}_$suffix
    if [[ -n ${!name:-} ]]; then
        settings[$suffix]=${!name}
    elif [[ -n ${file_values[$name]:-} ]]; then
        settings[$suffix]=${file_values[$name]}
    else
        missing+=("$name")
    fi
done
(( ${#missing[@]} == 0 )) || die "not set (environment or $env_file): ${missing[*]}"

payload="name=$node
sip_address=${settings[EXTERNAL_ADDRESS]}
ami_host=$node
ami_port=5038
ami_username=${settings[AMI_USER]}
ami_secret=${settings[AMI_SECRET]}
ari_url=http://$node:8088
ari_username=${settings[ARI_USER]}
ari_password=${settings[ARI_PASSWORD]}"

# Runs in the controlplane container (python:3.11-slim: no curl).
read -r -d '' register <<'PY' || true
import json, os, sys, urllib.error, urllib.request

node = dict(line.split("=", 1) for line in sys.stdin.read().splitlines() if "=" in line)
node["ami_port"] = int(node["ami_port"])
base = "http://127.0.0.1:%s" % os.environ.get("PBX_HTTP_PORT", "8080")
path = os.path.join(os.environ.get("PBX_DATA_DIR", "/var/lib/pbx"), "credentials.json")
try:
    with open(path) as f:
        operator = json.load(f)["operator"]
except (OSError, KeyError, ValueError) as exc:
    sys.exit(f"register-node: no operator credentials in {path} ({exc})")


def call(method, url, body=None, token=None):
    request = urllib.request.Request(base + url, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        sys.exit(f"register-node: {method} {url}: {exc.code} {exc.read().decode()[:2000]}")


token = call("POST", "/oauth/token", {
    "grant_type": "password", "client_id": operator["client_id"],
    "client_secret": operator["client_secret"], "username": operator["login"],
    "password": operator["password"], "scope": ""})["access_token"]
existing, after = None, None
while existing is None:
    page = call("GET", "/api/v1/nodes?limit=100" + (f"&after={after}" if after else ""),
                token=token)
    existing = next((n for n in page["items"] if n["name"] == node["name"]), None)
    after = page.get("next_after")
    if not after:
        break
if existing:
    result = call("PATCH", f"/api/v1/nodes/{existing['id']}", node, token)
    print(f"updated node {result['name']} (id {result['id']}); the agent reads the node once"
          f" at start: docker compose -f docker/compose.yaml restart {result['name']}-agent")
else:
    result = call("POST", "/api/v1/nodes", node, token)
    print(f"registered node {result['name']} (id {result['id']})")
print(json.dumps(result, indent=2))
PY

printf '%s\n' "$payload" | "${compose[@]}" exec -T controlplane python -c "$register"
