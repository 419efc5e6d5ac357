"""Pure-PyTorch ranking core: batch contract, FusionRanker, losses, metrics, training loop, artifacts."""
from mmrank.ranker.artifact import ArtifactError, latest_version, load_artifact, save_artifact
from mmrank.ranker.batch import (PAD_GRADE, Batch, ModalityDims, batch_from_arrays, collate, iterate_batches,
                                 make_collate, rows_to_batch)
from mmrank.ranker.fit import FitResult, batches_fn, build_model, fit, load_checkpoint, train_local
from mmrank.ranker.losses import LOSSES, get_loss
from mmrank.ranker.metrics import (average_precision, dcg_at_k, evaluate_lists, has_relevant, mean_metric,
                                   ndcg_at_k, per_list_metrics, reciprocal_rank)
from mmrank.ranker.model import FusionRanker

__all__ = [
    "PAD_GRADE", "Batch", "ModalityDims", "batch_from_arrays", "collate", "iterate_batches", "make_collate",
    "rows_to_batch", "FusionRanker", "LOSSES", "get_loss", "average_precision", "dcg_at_k", "evaluate_lists",
    "has_relevant", "mean_metric", "ndcg_at_k", "per_list_metrics", "reciprocal_rank", "FitResult", "fit",
    "train_local", "batches_fn", "build_model", "load_checkpoint", "ArtifactError", "save_artifact",
    "load_artifact", "latest_version",
]
