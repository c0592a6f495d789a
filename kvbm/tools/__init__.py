"""Tools built on the library, not part of it: a multi-round chat workload generator (`workload`), its replay
through a block manager with byte checks (`replay`), and the command line (`cli`: ``python -m kvbm.tools.cli``)."""
