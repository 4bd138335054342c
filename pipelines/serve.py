"""Serve the flow as a deployment so runs start from the Prefect UI (Deployments -> aligntok -> Run).

    prefect server start --host 127.0.0.1 &             # UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.serve [--profile ci]             # keeps running; picks up UI-triggered runs

`--profile` sets the deployment's default run-form values; every field can still be changed per run.
"""
import sys

from pipelines.flow import aligntok_pipeline, deployment_parser, run_form_defaults


def main(argv: list[str] | None = None) -> None:
    args = deployment_parser("python -m pipelines.serve", __doc__.splitlines()[0]).parse_args(argv)
    # one run at a time by default: stage processes use every core; runs queue instead of competing. The
    # deployment's own limit makes a queued run show that it waits for a slot (not "late") in the UI.
    aligntok_pipeline.serve(name=args.name, limit=args.concurrency, global_limit=args.concurrency, tags=["aligntok"],
                            parameters=run_form_defaults(args.profile), description="prepare -> tokenizer stages 1-3 -> cache-latents -> train-dit -> evaluate")


if __name__ == "__main__":
    main(sys.argv[1:])
