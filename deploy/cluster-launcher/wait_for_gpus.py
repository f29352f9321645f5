"""Ask the Ray autoscaler for N one-GPU workers and wait until they have joined.

depth-engine places one actor per GPU present when `label` starts, so on a cluster that
scales from zero GPU workers, run this on the head before submitting the job:

    ray submit deploy/cluster-launcher/aws.yaml deploy/cluster-launcher/wait_for_gpus.py 8

N = 0 withdraws the request; idle workers then stop after idle_timeout_minutes.
"""
import sys
import time

import ray
from ray.autoscaler.sdk import request_resources

want = int(sys.argv[1])
timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 1800
ray.init(address="auto", log_to_driver=False)
request_resources(bundles=[{"GPU": 1}] * want)
deadline = time.monotonic() + timeout_s
while (have := int(ray.cluster_resources().get("GPU", 0))) < want:
    if time.monotonic() > deadline:
        sys.exit(f"only {have} of {want} GPUs joined within {timeout_s:.0f} s")
    print(f"{have}/{want} GPUs", flush=True)
    time.sleep(15)
print(f"{have} GPUs in the cluster")
