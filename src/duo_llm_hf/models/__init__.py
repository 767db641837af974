"""The Duo models: configs, routes, the routed FFN with its router, one modeling file per architecture, losses.

Exactly the files `save_pretrained` copies next to a saved model for `trust_remote_code`, so they import only
torch, transformers and each other.
"""
