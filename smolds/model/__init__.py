"""The model: attention kinds (MLA, GQA, linear), DeepSeekMoE, and the Transformer that stacks them."""
