#!/bin/sh
# Writes the Docker secrets docker-compose.yml expects into deploy/docker/secrets/
# (git-ignored), each a fresh random value. The directory is the owner's only (0700);
# the files are 0644 because Compose bind-mounts them with these modes and Grafana and
# Prometheus run as non-root users. Existing files are kept, so running it again changes
# nothing; delete a file to rotate that secret (docs/deploy.md says what that costs).
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
chmod 700 "$dir"
umask 022
random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
write() {  # name value
  if [ ! -s "$dir/$1" ]; then printf '%s' "$2" > "$dir/$1"; echo "wrote $dir/$1"; fi
}
write control_token "$(random)"
write tenant_salt_secret "$(random)"
write redis_password "$(random)"
write grafana_admin_password "$(random)"
write metrics_key "sk-metrics-$(random)"
write client_key "sk-$(random)"
write api_keys.json "[{\"key\": \"$(cat "$dir/client_key")\", \"tenant\": \"default\"}, {\"key\": \"$(cat "$dir/metrics_key")\", \"tenant\": \"ops\", \"admin\": true}]"
echo "client API key: $dir/client_key (send it as 'Authorization: Bearer KEY')"
