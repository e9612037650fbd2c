#!/usr/bin/env bash
# A local MLflow tracking server for development, on 127.0.0.1 only.
#   infra/mlflow/start_local.sh [--s3 | --artifacts URI] [--port PORT] [--dir DIR]
# Backend: $MLFLOW_BACKEND_URI when set (e.g. postgresql://mlflow:pw@127.0.0.1:5432/mlflow, needs
# psycopg2), else sqlite in DIR. Artifacts: a folder in DIR; with --s3 a local S3 (moto server on PORT+1,
# bucket "mlflow-local") so the S3 artifact path the cluster uses is exercised on a laptop; with
# --artifacts s3://bucket/prefix an S3 you already have (MLFLOW_S3_ENDPOINT_URL for a non-AWS endpoint).
# Runs in the foreground; Ctrl-C (or SIGTERM to this script) stops the server and the local S3.
set -euo pipefail

port=5000
dir=".mlflow-local"
use_s3=0
artifacts=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --s3) use_s3=1; shift ;;
    --artifacts) artifacts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "start_local.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
backend="${MLFLOW_BACKEND_URI:-sqlite:///$dir/mlflow.db}"
children=()
cleanup() {
  for pid in "${children[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if [[ $use_s3 == 1 ]]; then
  s3_port=$((port + 1))
  moto_server -H 127.0.0.1 -p "$s3_port" >"$dir/s3.log" 2>&1 &
  children+=($!)
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local}"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
  export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$s3_port"
  python - "$MLFLOW_S3_ENDPOINT_URL" <<'PY'
import sys, time, boto3, botocore.exceptions
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for _ in range(100):  # the S3 server needs a moment to listen
    try:
        s3.create_bucket(Bucket="mlflow-local")
        break
    except botocore.exceptions.EndpointConnectionError:
        time.sleep(0.1)
else:
    sys.exit(f"local S3 at {sys.argv[1]} did not start")
PY
  artifacts="s3://mlflow-local/artifacts"
  echo "local S3: $MLFLOW_S3_ENDPOINT_URL (bucket mlflow-local)"
elif [[ -z $artifacts ]]; then
  artifacts="$dir/artifacts"
fi

echo "MLflow: backend $backend, artifacts $artifacts"
echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$port"
mlflow server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --host 127.0.0.1 --port "$port" --workers 1 &
children+=($!)
wait "${children[-1]}"
