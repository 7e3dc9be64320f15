"""Entrypoint for `ray job submit`:

    ray job submit --address http://HEAD:8265 --runtime-env infra/runtime_env.yaml --working-dir . -- \
        python jobs/render_campaign.py manifest=s3://bucket/campaign.parquet output=s3://bucket/campaign-42 cluster=gpu

Hydra overrides pass straight through. Inside a job Ray sets RAY_ADDRESS, so `cluster.address`
may stay "auto" (cluster=gpu) and the driver joins the cluster it was submitted to.
"""

from heygem_ray.cli import exit_now, render_main

if __name__ == "__main__":
    exit_now(render_main())
