"""Training for tools/train.py: config, data order, compiled steps, checkpoints, the loop and its reports.

Each module is importable on its own; only step.py and trainer.py need MindSpore and the model package.
"""
