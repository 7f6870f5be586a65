"""The language-model side: the text formats (`text`), model and tokenizer (`model`), SFT
through TRL (`training`, `pretrain`), exact action scoring (`scoring`), tabulation over
histories (`tabulate`), batched rollouts (`rollout`) and LM metrics (`metrics`)."""
