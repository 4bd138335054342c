"""The pipeline's stages: one module per `aligntok <stage>` command (the dvc.yaml stages and the tools around them)."""
