#!/bin/sh
# Prepares every MinIO node for Chitram; run by the one-shot `minio-setup` service of
# docker-compose.yml (image minio/mc) on every `docker compose up`, so each step is idempotent.
#
# For each node: wait until it answers with the root credentials, create the bucket, and, when
# CHITRAM_S3_ACCESS_KEY is set, create (or update) the policy in chitram-policy.json and a user
# holding it, then check that user can list the bucket. Chitram then uses that user's keys,
# never the root ones.
#
# POSIX sh only: the minio/mc image is a minimal Red Hat UBI image with a shell, coreutils and
# `mc`, but no guarantee of grep, sed or awk, so nothing here relies on them.
#
# Environment:
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   root credentials of the nodes (required)
#   CHITRAM_S3_ACCESS_KEY                  the user Chitram connects as (none: skip IAM setup)
#   CHITRAM_S3_SECRET_KEY                  its secret (8 characters or more)
#   MINIO_NODES                            host names, space-separated (default: minio-1..4)
#   MINIO_PORT                             their S3 port (default 9000)
#   SETUP_TRIES                            attempts, 2 s apart, while a node starts (default 30)
set -eu

# The bucket is fixed: chitram-policy.json grants access to it by name, and config/docker.toml
# names it for every shard.
BUCKET=chitram
POLICY_NAME=chitram-rw
POLICY_FILE=$(dirname "$0")/chitram-policy.json

: "${MINIO_ROOT_USER:?MINIO_ROOT_USER must be set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD must be set}"
CHITRAM_S3_ACCESS_KEY=${CHITRAM_S3_ACCESS_KEY:-}
CHITRAM_S3_SECRET_KEY=${CHITRAM_S3_SECRET_KEY:-}
MINIO_NODES=${MINIO_NODES:-minio-1 minio-2 minio-3 minio-4}
MINIO_PORT=${MINIO_PORT:-9000}
SETUP_TRIES=${SETUP_TRIES:-30}
# mc keeps its aliases here; /tmp is writable whatever user the container runs as.
export MC_CONFIG_DIR="${MC_CONFIG_DIR:-/tmp/.mc}"

say() {
    echo "minio-setup: $*"
}

fail() {
    echo "minio-setup: error: $*" >&2
    exit 1
}

# retry WHAT COMMAND...: runs COMMAND until it succeeds, SETUP_TRIES times at most; on the last
# failure prints its output and returns 1.
retry() {
    what=$1
    shift
    attempt=1
    while :; do
        if output=$("$@" 2>&1); then
            return 0
        fi
        if [ "$attempt" -ge "$SETUP_TRIES" ]; then
            echo "minio-setup: error: $what failed after $attempt attempts:" >&2
            echo "$output" >&2
            return 1
        fi
        attempt=$((attempt + 1))
        sleep 2
    done
}

# Attaching a policy that is already attached is an error in mc ("The specified policy change is
# already in effect"); treat exactly that case as success.
attach_policy() {
    target=$1
    if output=$(mc admin policy attach "$target" "$POLICY_NAME" --user "$CHITRAM_S3_ACCESS_KEY" 2>&1); then
        return 0
    fi
    case $output in
        *"already in effect"*) return 0 ;;
        *)
            echo "$output" >&2
            return 1
            ;;
    esac
}

if [ -n "$CHITRAM_S3_ACCESS_KEY" ]; then
    [ -n "$CHITRAM_S3_SECRET_KEY" ] || fail "CHITRAM_S3_ACCESS_KEY is set but CHITRAM_S3_SECRET_KEY is empty"
    [ "${#CHITRAM_S3_ACCESS_KEY}" -ge 3 ] || fail "CHITRAM_S3_ACCESS_KEY must be at least 3 characters"
    [ "${#CHITRAM_S3_SECRET_KEY}" -ge 8 ] || fail "CHITRAM_S3_SECRET_KEY must be at least 8 characters"
    [ "$CHITRAM_S3_ACCESS_KEY" != "$MINIO_ROOT_USER" ] \
        || fail "CHITRAM_S3_ACCESS_KEY must differ from MINIO_ROOT_USER (Chitram gets its own user)"
    [ -r "$POLICY_FILE" ] || fail "policy file $POLICY_FILE is missing"
fi

# Word splitting of MINIO_NODES is intended: it is a space-separated list.
# shellcheck disable=SC2086
for node in $MINIO_NODES; do
    url="http://$node:$MINIO_PORT"
    say "$node: waiting for $url"
    retry "$node: setting the root alias" \
        mc alias set "$node" "$url" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" --api S3v4
    retry "$node: reaching the server with the root credentials (check MINIO_ROOT_USER/PASSWORD)" \
        mc admin info "$node"

    mc mb --ignore-existing "$node/$BUCKET"

    if [ -z "$CHITRAM_S3_ACCESS_KEY" ]; then
        say "$node: CHITRAM_S3_ACCESS_KEY is empty; no Chitram user created"
        continue
    fi
    # `policy create` replaces a policy of the same name, and `user add` resets an existing
    # user's secret, so a changed policy file or secret takes effect on the next run.
    mc admin policy create "$node" "$POLICY_NAME" "$POLICY_FILE"
    mc admin user add "$node" "$CHITRAM_S3_ACCESS_KEY" "$CHITRAM_S3_SECRET_KEY" >/dev/null
    attach_policy "$node" || fail "$node: attaching policy $POLICY_NAME to $CHITRAM_S3_ACCESS_KEY failed"

    # Prove the credentials Chitram will use can reach the bucket.
    mc alias set "$node-chitram" "$url" "$CHITRAM_S3_ACCESS_KEY" "$CHITRAM_S3_SECRET_KEY" --api S3v4 >/dev/null
    retry "$node: listing $BUCKET as $CHITRAM_S3_ACCESS_KEY" mc ls "$node-chitram/$BUCKET"
    say "$node: bucket $BUCKET ready, user $CHITRAM_S3_ACCESS_KEY holds policy $POLICY_NAME"
done

say "all nodes ready"
