"""Per-character voices: a training set from stored dialogue (dataset.py), a LoRA trained on it
with PEFT (train.py)."""
