"""Training commands: pretrain, extend, finetune, contrastive; shared pieces in common.py."""
