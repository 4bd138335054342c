"""Serve the flow as a deployment so runs start from the Prefect UI (Deployments -> aligntok -> Run).

    prefect server start --host 127.0.0.1 &             # UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.serve                            # keeps running; picks up UI-triggered runs
"""
from pipelines.flow import aligntok_pipeline

if __name__ == "__main__":
    # limit=1: stage processes use every core; runs queue instead of competing.
    aligntok_pipeline.serve(name="aligntok", limit=1, tags=["aligntok"],
                            description="prepare -> tokenizer stages 1-3 -> cache-latents -> train-dit -> evaluate")
