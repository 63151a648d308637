#!/usr/bin/env bash
# Installs the validators the infra/ tests run (Debian/Ubuntu):
#   haproxy         -> `haproxy -c -f infra/haproxy/haproxy.cfg`   (needs >= 2.6)
#   docker-compose  -> `docker-compose -f infra/docker/compose.yaml config`
# A `docker compose` v2 plugin, when present, is used instead and nothing is
# installed for it. No Docker engine is needed or installed: `config` only
# parses and interpolates the file. Idempotent: nothing is installed when
# the tools are there.
#
# apt-get runs as root, or through sudo when sudo needs no password. Else
# this script says what it would install and installs nothing.
# cfn-lint (TestTemplateCfnLint) is a PyPI package (Debian has none): this
# script does not install it, only says whether it is there.
#
# A test whose tool is missing is skipped with a message naming it; in CI
# (CI set, as .ci/run runs) it fails instead, so that CI never passes without
# running the checks. PEFTD_SKIP_INFRA=1 installs nothing and skips them all.
set -euo pipefail

if [ "${PEFTD_SKIP_INFRA:-}" = 1 ]; then
  echo "setup-infra: PEFTD_SKIP_INFRA=1: nothing installed; the infra tool checks are skipped"
  exit 0
fi

pkgs=()
command -v haproxy >/dev/null 2>&1 || pkgs+=(haproxy)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  # Debian bookworm ships compose v1.29.2 (python) as docker-compose; trixie
  # and later ship v2 under the same name. Both validate the file.
  pkgs+=(docker-compose)
fi

if [ "${#pkgs[@]}" -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "setup-infra: ${pkgs[*]} not installed, and installing them needs root (apt-get; sudo is missing or asks for a password)." >&2
      echo "setup-infra: not installing them; the infra tests that need them are skipped (they fail in CI). To run them:" >&2
      echo "setup-infra:   sudo apt-get install --no-install-recommends ${pkgs[*]}" >&2
      pkgs=()
    fi
  fi
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "setup-infra: installing Debian packages for the infra/ checks: ${pkgs[*]} (apt-get${sudo[*]:+ through sudo}; PEFTD_SKIP_INFRA=1 skips this)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    # --no-install-recommends keeps docker.io/containerd (an engine) out.
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  fi
fi

if command -v haproxy >/dev/null 2>&1; then
  hv="$(haproxy -v 2>/dev/null | sed -n 's/^HA-\?Proxy version \([0-9]*\.[0-9]*\).*/\1/p' | head -1 || true)"
  case "$hv" in
    1.*|2.[0-5]) echo "setup-infra: haproxy $hv is too old (need >= 2.6 for 'balance hash')" >&2; exit 1 ;;
  esac
fi
compose="$( (docker compose version 2>/dev/null || docker-compose version --short 2>/dev/null) | head -1 || true)"
lint="$(cfn-lint --version 2>/dev/null | head -1 || true)"
echo "setup-infra: haproxy ${hv:-missing}; compose: ${compose:-missing}; cfn-lint: ${lint:-missing}"
if [ -z "$lint" ]; then
  echo "setup-infra: cfn-lint not found: it is a PyPI package (pip install cfn-lint; Debian has none), not installed by this script;" >&2
  echo "setup-infra: TestTemplateCfnLint is skipped (it fails in CI)" >&2
fi
