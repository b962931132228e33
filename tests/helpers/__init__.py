"""What the tests share: runs of the entry points and their comparison, data trees, a local Slurm cluster, counters of
host syncs, the official model as a reference, and fault injection (faults/). Not tests themselves (tests/README.md)."""
