"""The PCVR HyFormer model.

``build.build_model`` assembles it from a config and a feature layout; ``hyformer`` holds the
model and its blocks, ``inputs`` the input stage (NS and sequence tokens), ``tokens`` the
feature tokenizers, ``modules`` the token-level building blocks, ``decoupling`` the
endogenous-decoupling representation and losses, and ``outputs`` the contract a ranking
model offers the trainer.
"""
