"""GPT causal-LM finetuning on plain text (PTB, WikiText-2/103) with random-LTD / TokenBypass:
``data.py`` (text -> .bin/.idx), ``finetune.py`` (the run), ``layer_sweep.py`` (Fig. 5)."""
