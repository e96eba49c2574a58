#!/usr/bin/env bash
# A local S3-protocol server (moto) for trying the S3 storage root without AWS.
# Prints the environment to export; stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-9000}"
cat <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export MYCELIUM_STORAGE_ROOT=s3://mycelium/run
# then create the bucket once:  .venv/bin/python -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$port', region_name='us-east-1').create_bucket(Bucket='mycelium')"
ENV
exec .venv/bin/moto_server -H 127.0.0.1 -p "$port"
