"""Deploy the flow to a Prefect work pool, so UI-triggered runs execute on the pool's workers (GPU nodes), not on
the machine that serves the UI.

    prefect server start --host 127.0.0.1 &                       # or your team's Prefect server
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.deploy --pool aligntok-gpu [--profile imagenet256]
    # on each GPU node, in this checkout on the cluster's shared file system:
    prefect worker start --pool aligntok-gpu                      # a process worker: runs the flow right there

The deployment's code source is this checkout (a shared file system path), so a worker runs exactly the code,
params and DVC cache the submitting user sees. The pool is created as a `process` pool if it does not exist.
For Kubernetes, create a `kubernetes` pool whose job template mounts the shared volume and uses an image with this
project installed; for Slurm, run `prefect worker start` inside a long-lived allocation (or use a pool type that
submits jobs) — the flow itself is the same; only where its process starts changes.
"""
import asyncio
import sys

from pipelines.flow import ROOT, aligntok_pipeline, deployment_parser, run_form_defaults


async def ensure_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))


def main(argv: list[str] | None = None) -> str:
    parser = deployment_parser("python -m pipelines.deploy", __doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="work pool name (created as a process pool if missing)")
    args = parser.parse_args(argv)
    asyncio.run(ensure_pool(args.pool))
    deployment_id = aligntok_pipeline.from_source(source=str(ROOT), entrypoint="pipelines/flow.py:aligntok_pipeline").deploy(
        name=args.name, work_pool_name=args.pool, parameters=run_form_defaults(args.profile),
        tags=["aligntok"],
        description="prepare -> tokenizer stages 1-3 -> cache-latents -> train-dit -> evaluate, on a work pool",
        concurrency_limit=args.concurrency, print_next_steps=False)
    print(f"deployment aligntok-pipeline/{args.name} ({deployment_id}) on pool {args.pool}; "
          f"start a worker: prefect worker start --pool {args.pool}")
    return str(deployment_id)


if __name__ == "__main__":
    main(sys.argv[1:])
