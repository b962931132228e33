"""A run's checkpoints: ``format`` (file names and keys, a leaf), ``store`` (atomic single-file and sharded writes and
reads), ``states`` (the trainer's registered state objects), ``resume`` (which checkpoint a start continues from, and
whether it belongs to this run), ``checkpointer`` (what goes in, when, and what is loaded). Import the submodule you
need: this face stays light so that the model's weight loader can read ``format`` without the distributed side."""
