"""Training commands: pretrain, extend, contrastive, finetune, glue; shared run arguments in
args.py, the loop skeleton in loop.py, optimizer and schedule in optim.py, processes and
checkpoints in common.py."""
