"""Local training: one site's data, one fold, one epoch at a time.

Knows nothing about networking: the federated client calls
:meth:`LocalTrainer.run_epoch` exactly as the local loop does.
"""
