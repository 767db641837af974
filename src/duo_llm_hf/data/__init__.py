"""Text for training and evaluation: the built-in corpus, Hub and local datasets, packing (`corpus`), tokenizers."""

# The words of a corpus spec (`corpus.parse_corpus_spec`): here, not in `corpus`, so that the commands' argument
# definitions (and their ``--help``) read them without importing datasets or torch.
BUILTIN = "builtin"
NONE = "none"
HUB_PREFIX = "hf:"
