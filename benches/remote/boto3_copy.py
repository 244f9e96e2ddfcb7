"""Upload the files named on stdin to s3://BUCKET/PREFIX/<n> with boto3's managed transfer
(what `aws s3 cp` runs), download them into DIR, and print the two durations in seconds."""

import os
import sys
import time

import boto3
from botocore.config import Config

bucket, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
files = [line.strip() for line in sys.stdin if line.strip()]
s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["AWS_ENDPOINT"],
    region_name=os.environ.get("AWS_REGION", "us-east-1"),
    config=Config(max_pool_connections=16),
)
os.makedirs(out, exist_ok=True)
t0 = time.perf_counter()
for i, f in enumerate(files):
    s3.upload_file(f, bucket, f"{prefix}/{i}")
t1 = time.perf_counter()
for i, _ in enumerate(files):
    s3.download_file(bucket, f"{prefix}/{i}", os.path.join(out, str(i)))
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
