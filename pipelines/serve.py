"""Serve the flow as a deployment so runs start from the Prefect UI (Deployments -> aligntok -> Run).

    prefect server start --host 127.0.0.1 &             # UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.serve [--profile ci]             # keeps running; picks up UI-triggered runs

`--profile` sets the deployment's default run-form values; every field can still be changed per run.
"""
import argparse
import sys

from pipelines.flow import PipelineParams, aligntok_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="aligntok", help="deployment name (default: aligntok)")
    parser.add_argument("--profile", default="smoke", choices=PipelineParams.model_fields["profile"].annotation.__args__,
                        help="default profile in the run form (default: smoke)")
    args = parser.parse_args(argv)
    defaults = PipelineParams(profile=args.profile).model_dump(mode="json")
    # limit=1: stage processes use every core; runs queue instead of competing.
    aligntok_pipeline.serve(name=args.name, limit=1, tags=["aligntok", args.profile], parameters={"params": defaults},
                            description="prepare -> tokenizer stages 1-3 -> cache-latents -> train-dit -> evaluate")


if __name__ == "__main__":
    main(sys.argv[1:])
