"""The stages a run chains (pre-training, MvCoM fine-tuning): each a Stage the training loop runs."""
