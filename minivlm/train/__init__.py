"""Training: config (TrainConfig, the command line, recipes), loop (the loop behind train_pretrain.py and
train_sft.py), sampler, optim (AdamW groups, schedule), resume (checkpoints, exact resume), features
(the frozen tower's feature cache).
"""
