"""Local training: the trainer, DP-SGD engines, multi-process (DDP) rounds and centralised pretraining."""
