"""Distributed training on Spark: data loaders (petastorm, direct Parquet) and backends (local, Horovod,
TorchDistributor). See `loaders` and `backends`."""
