#!/usr/bin/env bash
# Provision the docker-compose federation: start RabbitMQ, declare fedmq's topology, create the coordinator's
# and the four hospitals' broker users, and write every config file under $FEDMQ_DEPLOY_DIR (default ./deploy):
#
#   deploy/broker/admin.toml        how fedmq administers this broker (from RABBITMQ_ADMIN_PASSWORD)
#   deploy/coordinator-broker.toml  the coordinator's broker URL (written by `fedmq broker declare`)
#   deploy/coordinator.toml         the coordinator's config (mounted into its container)
#   deploy/sites/<site>.toml        each hospital's config (from `fedmq broker add-site`, plus task and agent)
#   deploy/sites/<site>.signing.key each hospital's signing key (`fedmq site keygen`; only its .pub is registered)
#   deploy/keys/                    the coordinator's signing key pair and the hospitals' public keys (sites/)
#   deploy/coordinator-state/ deploy/site-state/<site>/ deploy/certs/<name>/
#
# fedmq itself runs from the coordinator image on the compose network, as your own uid, so the files are yours.
# Running it again keeps existing passwords and config files (delete a file to have it written anew).
set -euo pipefail

cd "$(dirname "$0")"
SITES=(cleveland hungary switzerland long-beach)

if [[ ! -f .env ]]; then
    echo "provision.sh: copy .env.example to .env and set RABBITMQ_ADMIN_PASSWORD and GRAFANA_ADMIN_PASSWORD" >&2
    exit 1
fi
set -a
# shellcheck disable=SC1091
source ./.env
set +a
: "${RABBITMQ_ADMIN_PASSWORD:?set RABBITMQ_ADMIN_PASSWORD in .env}"
if [[ ! "$RABBITMQ_ADMIN_PASSWORD" =~ ^[A-Za-z0-9_-]{16,}$ ]]; then
    echo "provision.sh: use at least 16 letters, digits, '_' or '-' for RABBITMQ_ADMIN_PASSWORD (openssl rand -hex 24)" >&2
    exit 1
fi

# The containers must run as the owner of the deploy dir to read its 0600 files: record our uid/gid in .env.
if [[ -z "${FEDMQ_UID:-}" || -z "${FEDMQ_GID:-}" ]]; then
    FEDMQ_UID=$(id -u)
    FEDMQ_GID=$(id -g)
    sed -i -e '/^FEDMQ_UID=/d' -e '/^FEDMQ_GID=/d' .env
    printf 'FEDMQ_UID=%s\nFEDMQ_GID=%s\n' "$FEDMQ_UID" "$FEDMQ_GID" >> .env
    export FEDMQ_UID FEDMQ_GID
fi

DEPLOY_DIR=$(realpath -m "${FEDMQ_DEPLOY_DIR:-./deploy}")
umask 077
mkdir -p "$DEPLOY_DIR/broker" "$DEPLOY_DIR/sites" "$DEPLOY_DIR/coordinator-state" "$DEPLOY_DIR/certs/coordinator"
for site in "${SITES[@]}"; do
    mkdir -p "$DEPLOY_DIR/site-state/$site" "$DEPLOY_DIR/certs/$site"
done

cat > "$DEPLOY_DIR/broker/admin.toml" <<EOF
# How fedmq reaches and administers the compose broker (written by ops/docker/provision.sh). Keep private.
amqp_host = "rabbitmq"
amqp_port = 5672
management_url = "http://rabbitmq:15672"
prometheus_url = "http://rabbitmq:15692/metrics"

[admin]
user = "fedmq-admin"
password = "$RABBITMQ_ADMIN_PASSWORD"
EOF

echo "starting RabbitMQ and building the images (the first build downloads torch)..."
docker-compose build coordinator site-cleveland
docker-compose up -d rabbitmq
for _ in $(seq 1 60); do
    if docker-compose exec -T rabbitmq rabbitmq-diagnostics -q check_running > /dev/null 2>&1; then
        break
    fi
    sleep 2
done

run_fedmq() {
    docker-compose run --rm --no-deps -T --user "$FEDMQ_UID:$FEDMQ_GID" --volume "$DEPLOY_DIR:/deploy" \
        -e FEDMQ_STATE_DIR=/deploy --entrypoint fedmq coordinator "$@"
}

run_fedmq broker declare
for site in "${SITES[@]}"; do
    site_file="$DEPLOY_DIR/sites/$site.toml"
    if [[ -f "$site_file" ]]; then
        echo "keeping $site_file"
        continue
    fi
    # the hospital's signing key: made where the hospital's agent runs (here, the same deploy dir); only the
    # .pub is registered with the coordinator's key registry (deploy/keys/sites/)
    if [[ ! -f "$DEPLOY_DIR/sites/$site.signing.key" ]]; then
        run_fedmq site keygen "$site" --dir /deploy/sites
    fi
    run_fedmq broker add-site "$site" --public-key "/deploy/sites/$site.signing.pub"
    cat >> "$site_file" <<EOF

[task]
name = "heart-disease"

[agent]
state_dir = "/var/lib/fedmq"
EOF
done

coordinator_url=$(sed -n 's/^url = //p' "$DEPLOY_DIR/coordinator-broker.toml")
coordinator_file="$DEPLOY_DIR/coordinator.toml"
if [[ -f "$coordinator_file" ]]; then
    echo "keeping $coordinator_file"
else
    cat > "$coordinator_file" <<EOF
# The compose federation's coordinator (written by ops/docker/provision.sh); every option has a default.
task = "heart-disease"
sites = ["cleveland", "hungary", "switzerland", "long-beach"]
state_dir = "/var/lib/fedmq/coordinator"

[broker]
url = $coordinator_url

[strategy]
name = "fedbuff"

[metrics]
host = "0.0.0.0"   # inside the container, so that Prometheus can scrape it
port = 9464

[signing]
keys_dir = "/etc/fedmq/keys"   # deploy/keys: the coordinator's key pair and the hospitals' public keys
EOF
fi

echo "provisioned under $DEPLOY_DIR; now: docker-compose up -d"
