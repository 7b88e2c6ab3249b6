"""Using a trained model: sampling (generate.py), chatting (chat.py) and evaluation (evaluate.py).

Each reads a model directory written by smolds/pretrained.py (a run's `consolidated/` checkpoint, an import
or a conversion) and runs the model in eval mode (`smolds.model.transformer.eval_mode`).
"""
