"""The IMDb language-model task: tokenizer and small GPT-2 (``prepare``), sentiment reward models,
the PPO policy module and learner, the local trainer, evaluation metrics and sample generations."""
