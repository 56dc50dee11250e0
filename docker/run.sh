#!/usr/bin/env bash
# Run the serving image as it runs on Compute Engine (deploy/cloud-init.yaml does the same):   make docker-run
#
#   HTTP_PUBLISH     where :8080 is published (default 127.0.0.1:8080; 0.0.0.0:8080 for other machines)
#   METRICS_PUBLISH  TorchServe's Prometheus metrics, on this host's loopback only (default 127.0.0.1:8082)
#   LOGS             host folder for the server's logs, the input-statistics log gtsrb_inputs.jsonl among them
#                    (default logs/container; `make drift-report` reads it with --log 'logs/container/gtsrb_inputs.jsonl*')
#   MEMORY           memory limit of the container (default 4g; docker/README.md, "Memory")
#   CPUS             CPU limit of the container (default 2: the two workers)
#   NAME             container name (default gtsrb)
# Other arguments go to `docker run` (e.g. -d). Ctrl-C or `docker stop` drains: requests in flight finish.
# Locked down as on the VM (deploy/cloud-init.yaml, the same flags): read-only root file system (TorchServe's temp
# folder and /tmp are tmpfs), no capabilities, no privilege gain (setuid), at most 512 processes and threads.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-gtsrb-serve:latest}
docker=${DOCKER:-docker}
logs=${LOGS:-logs/container}

mkdir -p "$logs"
# The container writes the log folder as your uid (group 0, which the image's folders admit), so the files stay
# yours. As root, it runs as the image's own unprivileged user instead, which then owns the folder.
if [ "$(id -u)" = 0 ]; then
  user=10001:10001
  chown 10001:10001 "$logs"
else
  user="$(id -u):0"
fi
tty=()
[ -t 0 ] && tty=(-it)
exec $docker run --rm "${tty[@]}" --name "${NAME:-gtsrb}" --user "$user" \
  --memory "${MEMORY:-4g}" --memory-swap "${MEMORY:-4g}" --cpus "${CPUS:-2}" --stop-timeout 45 \
  --read-only --tmpfs /home/model-server/tmp:rw,nosuid,nodev,exec,size=256m,uid=10001,gid=0 \
  --tmpfs /tmp:rw,nosuid,nodev,noexec,size=64m --cap-drop=ALL --security-opt=no-new-privileges --pids-limit=512 \
  -p "${HTTP_PUBLISH:-127.0.0.1:8080}:8080" \
  -p "${METRICS_PUBLISH:-127.0.0.1:8082}:8082" -e TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
  -v "$(cd "$logs" && pwd)":/home/model-server/logs \
  "$@" "$image"
