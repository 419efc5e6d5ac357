"""mmrank: multimodal fusion ranking of e-commerce products on Spark + Delta Lake."""
__version__ = "0.1.0"
