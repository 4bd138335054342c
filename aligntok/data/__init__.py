"""Data: sources -> parquet shards + manifest (`sources`), datasets over shards (`dataset`), latent cache."""
