"""Data sources and their checks: the sample generator and landing zone, ingestion of the sample, the fashion
catalog and bring-your-own files (`ingest.py` holds what they share), row validation. See docs/data.md."""
