"""Reports: markdown tables (`tables`), plots (`plots`), task pictures (`taskgraph`), the
self-training report (`selftrain`) and the temperature-versus-retraining report (`temperature`)."""
