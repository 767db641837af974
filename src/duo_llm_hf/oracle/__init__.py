"""Stage 2, the oracle: every route a token can take under a budget (`spaces`), the prefix-tree search that
evaluates them (`engine`), what is kept of the losses (`reducers`, `results`) and the resumable run (`run`, its
flags in `arguments`)."""
