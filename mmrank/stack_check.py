"""Probes that the distributed stack works on this cluster; `python -m mmrank.stack_check` runs them.

Functions shipped to Spark/Horovod workers must live in an importable module, hence here, not in tests.
"""
from __future__ import annotations

import sys


def horovod_allreduce_probe() -> list[float]:
    """Run on every Horovod rank: returns [rank, size, sum over ranks of (rank + 1)]."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    out = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
    return [float(hvd.rank()), float(hvd.size()), out.item()]


def check_horovod(num_proc: int = 2) -> list[list[float]]:
    """Launch `horovod_allreduce_probe` on `num_proc` ranks of the active Spark session."""
    import horovod.spark

    return horovod.spark.run(horovod_allreduce_probe, num_proc=num_proc, verbose=0)


def main() -> int:
    from mmrank.config import load_config
    from mmrank.spark import get_spark

    spark = get_spark(load_config(sys.argv[1] if len(sys.argv) > 1 else None))
    n = spark.range(1000).selectExpr("sum(id)").first()[0]
    print(f"spark ok ({spark.version}), sum check {n == 499500}")
    res = check_horovod(2)
    ok = all(r[2] == 3.0 for r in res)
    print(f"horovod allreduce on {len(res)} ranks: {'ok' if ok else 'WRONG'} {res}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
