"""Pure-PyTorch ranking core on the batch contract (`batch`): the FusionRanker (`model`, with its fusions in
`fusion`), losses, metrics, the training loop (`fit`), artifacts, and the non-neural baselines."""
