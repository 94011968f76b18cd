# shellcheck shell=bash
# Shared by scripts/test and scripts/bench. Sourced, not run: it defines functions only.
#
# A fresh machine has Rust, Python, PostgreSQL and MariaDB but none of the Python-shipped
# services (OpenBao, moto), and its databases may be stopped; these helpers make both true
# without redoing work that is already done.

mayfly_log() { printf '==> %s\n' "$*" >&2; }

mayfly_die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# wait_until SECONDS WHAT CMD...: run CMD until it succeeds, at most SECONDS long.
wait_until() {
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || {
      printf 'error: %s not ready after %ss\n' "$what" "$secs" >&2
      return 1
    }
    sleep 0.5
  done
}

# ensure_venv ROOT: ROOT/.venv holds scripts/requirements-test.txt, and its bin/ is first on
# PATH so tests find `bao` and `moto_server`. A stamp with the hash of the requirements (and
# of the Python that built the venv) makes the second run a no-op instead of a pip round.
ensure_venv() {
  local root=$1
  local venv="$root/.venv" req="$root/scripts/requirements-test.txt"
  local stamp="$venv/.mayfly-requirements.sha256" want
  want="$({ python3 --version 2>&1; cat "$req"; } | sha256sum | cut -d' ' -f1)"
  if [[ -x $venv/bin/python && -f $stamp && "$(<"$stamp")" == "$want" ]] &&
    "$venv/bin/python" -c '' 2>/dev/null; then
    :
  else
    mayfly_log "installing $(grep -cv '^\s*\(#\|$\)' "$req") Python test tools into .venv"
    rm -f "$stamp"
    # A venv made by another Python (or half made) is cheaper to redo than to repair.
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    printf '%s\n' "$want" >"$stamp"
  fi
  export VIRTUAL_ENV=$venv
  export PATH="$venv/bin:$PATH"
  bao version >/dev/null || mayfly_die "bao from .venv does not run"
  command -v moto_server >/dev/null || mayfly_die "moto_server is not in .venv"
}

# ensure_node_modules DIR: DIR/node_modules holds what DIR/package-lock.json pins (the
# interop matrix's @grpc/grpc-js client), installed with the machine's node and npm; a
# stamp with the lock file's hash makes the second run a no-op.
ensure_node_modules() {
  local dir=$1 stamp want
  stamp="$dir/node_modules/.mayfly-lock.sha256"
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    mayfly_log "installing Node.js and npm (Debian packages)"
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  fi
  want="$({ node --version; cat "$dir/package-lock.json"; } | sha256sum | cut -d' ' -f1)"
  if [[ -f $stamp && "$(<"$stamp")" == "$want" ]]; then
    return 0
  fi
  mayfly_log "installing the Node interop client's packages into $dir/node_modules"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  printf '%s\n' "$want" >"$stamp"
}

ensure_postgres() {
  pg_isready -q -h 127.0.0.1 && return 0
  mayfly_log "starting PostgreSQL"
  local ver
  ver="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)"
  [[ -n $ver ]] || mayfly_die "no PostgreSQL cluster under /etc/postgresql"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  wait_until 30 PostgreSQL pg_isready -q -h 127.0.0.1
}

mariadb_ping() { mariadb-admin --connect-timeout=2 -h127.0.0.1 -uroot ping; }

ensure_mariadb() {
  mariadb_ping >/dev/null 2>&1 && return 0
  mayfly_log "starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_until 30 MariaDB mariadb_ping
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
