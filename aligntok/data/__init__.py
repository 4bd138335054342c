"""Data: sources -> parquet shards + manifest (`sources`, per-shard work units in `units`, per-image conversion in
`images`), streaming datasets over shards (`dataset` on `reader`, training order in `order`), latent cache
(`latents`, memory-mapped)."""
