"""What goes into the model: the processor (tokenizer + chat template), images and video,
placeholder expansion, chat messages, prompts, and the tool-call format."""
