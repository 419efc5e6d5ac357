"""Test and benchmark support, never used by the pipeline: synthetic media bytes (`media`) and synthetic
`training_lists` rows whose grades depend on the features (`lists`)."""
