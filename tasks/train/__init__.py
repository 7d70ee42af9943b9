"""Training: the loop, DistributedDataParallel, the train stage."""
