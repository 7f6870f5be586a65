"""Reports: markdown tables (`tables`), plots (`plots`), the self-training report
(`selftrain`) and the temperature-versus-retraining report (`temperature`)."""
