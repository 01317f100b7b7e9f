"""GLUE finetuning (Megatron-LM's tasks/glue): MNLI and QQP readers and the classifier run."""
