"""Text for training and evaluation: the built-in corpus, Hub and local datasets, packing (`corpus`), tokenizers."""
