"""RACE finetuning (Megatron-LM's tasks/race): the reader and the multiple-choice run."""
