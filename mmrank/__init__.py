"""mmrank: multimodal fusion ranking of e-commerce products on Spark + Delta Lake."""
from mmrank.task_start import cheap_zip_invalidation

__version__ = "0.1.0"

cheap_zip_invalidation()  # Spark Python workers import mmrank with their first task: later tasks start faster
