#!/usr/bin/env bash
# Installs the validators the infra/ tests run (Debian/Ubuntu CI runners):
#   haproxy         -> `haproxy -c -f infra/haproxy/haproxy.cfg`   (needs >= 2.6)
#   docker-compose  -> `docker-compose -f infra/docker/compose.yaml config`
# A `docker compose` v2 plugin, when present, is used instead and nothing is
# installed for it. No Docker engine is needed or installed: `config` only
# parses and interpolates the file. Idempotent. Without these tools the infra
# tests fail unless PEFTD_SKIP_INFRA=1.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

pkgs=()
command -v haproxy >/dev/null 2>&1 || pkgs+=(haproxy)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  # Debian bookworm ships compose v1.29.2 (python) as docker-compose; trixie
  # and later ship v2 under the same name. Both validate the file.
  pkgs+=(docker-compose)
fi

if [ "${#pkgs[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  # --no-install-recommends keeps docker.io/containerd (an engine) out.
  $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

hv="$(haproxy -v 2>/dev/null | sed -n 's/^HA-\?Proxy version \([0-9]*\.[0-9]*\).*/\1/p' | head -1)"
case "$hv" in
  1.*|2.[0-5]) echo "setup-infra: haproxy $hv is too old (need >= 2.6 for 'balance hash')" >&2; exit 1 ;;
esac
echo "setup-infra: haproxy ${hv:-?}; compose: $( (docker compose version 2>/dev/null || docker-compose version --short 2>/dev/null) | head -1)"
# cfn-lint (template.yaml) ships with the machine image's Python; nothing to
# install from here, but say so early if it is missing.
command -v cfn-lint >/dev/null 2>&1 || echo "setup-infra: cfn-lint not found; TestTemplateCfnLint will fail (PEFTD_SKIP_INFRA=1 skips it)" >&2
