#!/usr/bin/env bash
# Entry point of both images (run under tini). Three jobs, then `exec "$@"`:
#
#  1. `init` as the command: one-off set-up of the metadata DB (docker-compose's airflow-init).
#  2. AIRFLOW_ADMIN_PASSWORD set: write SimpleAuthManager's password file from it, so the
#     login is the one in .env instead of a generated password printed to the log.
#  3. RLHF_GPUS_PER_WORKER=<n> on a GPU worker: claim n GPUs of this host that no other
#     replica holds (`docker compose up --scale airflow-worker-gpu=N` gives every replica
#     the same device list; a lock file per GPU UUID on the shared volume tells them apart)
#     and export CUDA_VISIBLE_DEVICES. The locks are held by this process's open file
#     descriptors, so they vanish with the container.
set -euo pipefail

write_password_file() {
  local file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-${AIRFLOW_HOME}/simple_auth_manager_passwords.json}"
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$file"
  mkdir -p "$(dirname "$file")"
  (umask 077 && python - "$file" <<'PY'
import json, os, sys
users = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
admin = os.environ.get("AIRFLOW_ADMIN_USER", "admin")
names = [u.split(":")[0] for u in users.split(",") if u.strip()]
if admin not in names:
    sys.exit(f"AIRFLOW_ADMIN_USER={admin!r} is not in AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS={users!r}")
with open(sys.argv[1], "w") as f:
    json.dump({admin: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, f)
PY
  )
}

claim_gpus() {
  local want="$1" dir="${RLHF_GPU_LOCK_DIR:-/shared/locks}" got=() fd line idx uuid
  command -v nvidia-smi >/dev/null || { echo "RLHF_GPUS_PER_WORKER=$want but no nvidia-smi: is the NVIDIA runtime on?" >&2; exit 1; }
  mkdir -p "$dir"
  while IFS=, read -r idx uuid; do
    uuid="${uuid// /}"
    exec {fd}>"$dir/gpu-$uuid.lock"
    if flock -n "$fd"; then
      got+=("${idx// /}")
      [[ ${#got[@]} -ge $want ]] && break
    else
      exec {fd}>&-
    fi
  done < <(nvidia-smi --query-gpu=index,uuid --format=csv,noheader)
  if [[ ${#got[@]} -lt $want ]]; then
    echo "wanted $want free GPU(s), got ${#got[@]}: more replicas than GPUs? (locks in $dir)" >&2
    exit 1
  fi
  CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${got[*]}")"
  export CUDA_VISIBLE_DEVICES
  echo "this worker holds GPU(s) $CUDA_VISIBLE_DEVICES" >&2
}

init_airflow() {
  # Idempotent: safe on every `docker compose up` and after an image upgrade.
  airflow db migrate
  airflow pools set gpu "${GPU_POOL_SLOTS:-1}" "GPU slots: how many GPU stages may run at once"
  airflow config get-value core executor
  echo "Airflow is initialised; log in as ${AIRFLOW_ADMIN_USER:-admin} with AIRFLOW_ADMIN_PASSWORD from .env"
}

if [[ -n "${AIRFLOW_ADMIN_PASSWORD:-}" ]]; then
  write_password_file
fi

if [[ "${RLHF_GPUS_PER_WORKER:-all}" =~ ^[0-9]+$ ]]; then
  claim_gpus "$RLHF_GPUS_PER_WORKER"
fi

if [[ "${1:-}" == "init" ]]; then
  init_airflow
  exit 0
fi

exec "$@"
